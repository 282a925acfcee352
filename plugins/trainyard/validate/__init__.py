"""The ``validate_data`` stage: the trigger conf gate and the data checks."""
