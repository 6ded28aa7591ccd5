"""How a row or a step fails in the engine."""
from __future__ import annotations

from typing import Sequence

from .sequence import GenerationRow


class RowFailed(ValueError):
    """A row the engine's tables cannot hold (a position past them, a token id outside the vocabulary),
    refused before it reaches the device: it fails alone, and says nothing about the device's health.
    `code`: prompt_too_long | invalid_token_id."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class StepFailed(RuntimeError):
    """A device pass failed; `rows` are the rows it took down (already released and told)."""

    def __init__(self, cause: Exception, rows: Sequence[GenerationRow]):
        super().__init__(str(cause))
        self.cause = cause
        self.rows = list(rows)
