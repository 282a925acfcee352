"""The ``trainyard`` command: lint, render, prepare-demo, summary."""
