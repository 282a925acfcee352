#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, under 8 minutes, results as JSON.
#
#   benchmarks/gpu_check.sh [--out DIR] [--dry-run] [--only a,b] [--skip a,b] [--keep-work]
#
# Run it from a checkout with the project's venv (.venv, `make setup`) holding a CUDA build of torch;
# PYTHON=/path/to/python picks another interpreter. Results: DIR/gpu_check.json (default $OUT, else
# ./gpu-check-out), one line per check on stdout, exit 1 if a check FAILed. benchmarks/gpu_checks.py
# says what each check does; --dry-run runs the same flow on CPU with tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
# torch.cuda.is_available() through NVML, not the CUDA driver: the checks are forked from one process.
export PYTORCH_NVML_BASED_CUDA_CHECK=1
# The checks stop themselves by 470 s; this is the backstop that keeps the whole run under 8 minutes
# (GPU_CHECK_TIMEOUT_S raises it along with --budget-scale on a slower machine).
exec timeout --kill-after=5 "${GPU_CHECK_TIMEOUT_S:-475}" "$PYTHON" benchmarks/gpu_checks.py "$@"
