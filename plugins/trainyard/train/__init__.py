"""The ``train`` stage: the run spec, the local trainer process and the Kubernetes pod."""
