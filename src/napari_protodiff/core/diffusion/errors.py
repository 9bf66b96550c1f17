"""Errors of the diffusion stage (one sentence each; the CLI maps them to exit status 2)."""

from __future__ import annotations

from ..errors import ProtodiffError, StoreError


class ModelError(ProtodiffError):
    """A model folder is missing, incomplete, from another version, or unusable."""


class PrototypeError(ProtodiffError):
    """A prototype id or mixture does not exist, or a store has no prototypes."""


class SamplingError(ProtodiffError):
    """Sampling parameters that cannot work (zero samples, absurd guidance, ...)."""


__all__ = ["ModelError", "PrototypeError", "SamplingError", "StoreError", "ProtodiffError"]
