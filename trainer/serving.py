"""The logged model's ``pyfunc``: a text-classification pipeline that truncates to the trained length.

MLflow logs this file as "models from code": it is copied into the model and executed when the
model is loaded, so it imports only mlflow, pandas and transformers, never the ``trainer`` package.

Why not the ``mlflow.transformers`` flavor's own pyfunc: in mlflow 3.17 it passes every input
string of a text-classification model through ``ast.literal_eval``, so ``"42"`` or ``"None"``
reach the pipeline as non-text and an unpunctuated text of ~1,500 words raises ``MemoryError``;
and it truncates only if told to. Here the input is always text and always truncated to
``model_config["max_length"]``, the length the model was trained with.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

#: The artifact (a ``save_pretrained`` directory: weights, config, tokenizer) the pipeline loads.
MODEL_DIR_ARTIFACT = "hf_model"
#: Inference settings persisted in the pyfunc flavor (``model_config``); ``max_length`` is required.
MAX_LENGTH_KEY = "max_length"
OUTPUT_COLUMNS = ("label", "score")


def as_texts(model_input: Any) -> list[str]:
    """The texts in what pyfunc hands over: a string, a list, a Series, a DataFrame (its ``text``
    column, else its only column) or ``{"text": ...}``. Values are used as text, never parsed."""
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            values = model_input["text"]
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected one text column, got columns {list(model_input.columns)}")
        return as_texts(values.tolist())
    if isinstance(model_input, dict):
        return as_texts(model_input.get("text"))
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.Series) or hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, list | tuple) and all(isinstance(v, str) for v in model_input):
        return list(model_input)
    raise ValueError("input must be text: a string, a list of strings, or a DataFrame with one text column")


class TextClassifier(PythonModel):
    """``predict(texts)`` -> a DataFrame of ``label`` and ``score``, one row per text."""

    def __init__(self, pipeline: Any = None, max_length: int | None = None) -> None:
        self._pipeline = pipeline
        self._max_length = max_length

    @classmethod
    def from_objects(cls, model: Any, tokenizer: Any, max_length: int) -> TextClassifier:
        """The same classifier around an in-memory model: the trainer infers the signature with it."""
        import transformers

        pipeline = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer)
        return cls(pipeline, max_length)

    def load_context(self, context: Any) -> None:
        import torch
        import transformers

        path = context.artifacts[MODEL_DIR_ARTIFACT]
        self._max_length = int(context.model_config[MAX_LENGTH_KEY])
        self._pipeline = transformers.pipeline(
            "text-classification",
            model=path,
            tokenizer=path,
            device=0 if torch.cuda.is_available() else -1,
        )

    # ``model_input`` has no type hint on purpose: mlflow would then accept only that type (a list,
    # not a bare string) instead of checking the logged signature. (It warns "Add type hints" once.)
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        texts = as_texts(model_input)
        if not texts:
            return pd.DataFrame(columns=list(OUTPUT_COLUMNS))
        outputs = self._pipeline(texts, truncation=True, max_length=self._max_length)
        return pd.DataFrame(outputs, columns=list(OUTPUT_COLUMNS))


set_model(TextClassifier())
