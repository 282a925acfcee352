# syntax=docker/dockerfile:1
# JupyterLab on the trainer image: notebooks and training pods share one environment.
#   docker build -f docker/jupyter.Dockerfile -t ghcr.io/trainyard/jupyter:0.1.0 .
# The compose stack passes the trainer image it builds itself (additional_contexts).
ARG TRAINER_IMAGE=ghcr.io/trainyard/trainer:0.2.0
FROM ${TRAINER_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

USER 0:0
COPY docker/jupyter-requirements.txt /tmp/jupyter-requirements.txt
RUN pip install --no-cache-dir -r /tmp/jupyter-requirements.txt \
    && rm /tmp/jupyter-requirements.txt \
    && mkdir -p /home/trainer/work \
    && chown 1000:1000 /home/trainer/work

ENV JUPYTER_RUNTIME_DIR=/tmp/jupyter-runtime
WORKDIR /home/trainer/work
USER 1000:1000
EXPOSE 8888

# The token comes from JUPYTER_TOKEN (never baked in).
ENTRYPOINT ["jupyter", "lab"]
CMD ["--ip=0.0.0.0", "--port=8888", "--no-browser", "--ServerApp.root_dir=/home/trainer/work"]
