"""The ``promote`` stage: the champion/challenger decision, the registry and the audit trail."""
