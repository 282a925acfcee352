"""Container-side trainer: ``python -m trainer --spec <json>`` fine-tunes one model run.

Importing this package is cheap (no torch); the heavy work lives in ``trainer.train``.
"""
