"""What the logged model takes: the table's own columns, as a pandas DataFrame holds them.

A model trained on a table of scalar columns is logged with a column signature (names and
types as the table has them), so `mlflow.pyfunc.load_model(uri).predict(frame)` takes a raw
DataFrame of the table: columns by name in any order, float64, float32 or integer as they
are. MLflow's `torch.export` format takes only one tensor of one dtype (a float64 frame
against a float32 tensor spec is refused), so such a model is saved pickled, with raydeep's
`models/` beside it; digits, synthetic data and list columns keep the exported tensor form.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

import numpy as np

MLFLOW_TYPES = {"bool": "boolean", "int8": "integer", "int16": "integer", "int32": "integer",
                "uint8": "integer", "uint16": "integer", "int64": "long", "uint32": "long",
                "uint64": "long", "halffloat": "float", "float": "float", "double": "double"}
"""Arrow type names -> MLflow column types; pandas reads each as the type on the left."""

NUMPY_TYPES = {"boolean": np.bool_, "integer": np.int32, "long": np.int64, "float": np.float32,
               "double": np.float64}


def signature(columns: list[tuple[str, str]]):
    """A column signature of the table's feature columns."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(MLFLOW_TYPES.get(t, "double"), name) for name, t in columns]))


def example_frame(x: np.ndarray, columns: list[tuple[str, str]]):
    """Rows of raw features `x` (N, columns) as the table's DataFrame would hold them."""
    import pandas as pd

    flat = x.reshape(len(x), -1)
    frame = {}
    for i, (name, t) in enumerate(columns):
        dtype = NUMPY_TYPES[MLFLOW_TYPES.get(t, "double")]
        values = flat[:, i]
        frame[name] = np.rint(values).astype(dtype) if np.issubdtype(dtype, np.integer) else values.astype(dtype)
    return pd.DataFrame(frame)


TORCH_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export",
                        "torch._export")
"""Where torch.export warns while it tries a module: a failed try prints the traced graph
there, pages of it, before raydeep's one line says the model is pickled instead."""


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # nn.GRU/LSTM re-assign their flat weights while traced: torch warns, the program is right
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def log_model(uri: str, run_id: str, model, input_example, code_paths=(), signature=None, say=print) -> None:
    """Log `model` as run `run_id`'s MLflow model.

    MLflow 3 saves it as a `torch.export` program by default ("pt2"): it loads with torch
    alone, anywhere. A module that cannot be exported (data-dependent control flow, say)
    is pickled instead, with its code beside it: raydeep's models/ and `code_paths`, a
    user's model code (`pipelines.imported_model.code_paths`), so it loads where neither
    is installed. The export fails before anything is written, so the second try does
    not log a second model. A column `signature` (a table's) is pickled at once.
    """
    import mlflow
    import mlflow.pytorch
    import torch

    import models

    mlflow.set_tracking_uri(uri)
    common = dict(name="model", input_example=input_example,
                  code_paths=[os.path.dirname(models.__file__), *code_paths],
                  pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])

    def pickled(**more):
        # MLflow warns of pickle's risks on every such save; raydeep chose it for a reason it
        # gives, so the warning tells users nothing they can act on.
        with _quiet("mlflow.pytorch"):
            mlflow.pytorch.log_model(model, serialization_format="pickle", **more, **common)

    with mlflow.start_run(run_id=run_id):
        if signature is not None:
            pickled(signature=signature)
            return
        try:
            with _quiet(*TORCH_EXPORT_LOGGERS):
                mlflow.pytorch.log_model(model, **common)
        except Exception as e:
            if not type(e).__module__.startswith("torch"):
                raise
            say(f"the model cannot be exported ({type(e).__name__}); it is logged pickled, with its code")
            pickled()
