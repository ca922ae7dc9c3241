"""Errors that stop a study before any run starts.

Pure Python (no torch), so that the API and the worker can map the codes to
responses without importing the engine.
"""

from __future__ import annotations


class StudyError(Exception):
    """A model, weights or dataset problem found while preparing a study.

    Attributes:
        code: stable machine-readable code, for example ``dataset_invalid``,
            ``weights_missing``, ``weights_rejected`` or ``model_unknown``.
        message: one or two sentences saying what is wrong and what to do.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
