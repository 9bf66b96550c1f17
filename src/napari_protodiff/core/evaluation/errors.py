"""Errors of the evaluation stage (bad cohorts, patch sets, encoders)."""

from __future__ import annotations

from ..errors import ProtodiffError


class EvaluationError(ProtodiffError):
    """Input to an evaluation is unusable: one sentence naming the file and what is wrong."""
