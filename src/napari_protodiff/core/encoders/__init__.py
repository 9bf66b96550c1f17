"""Patch encoders behind one interface (see :mod:`.registry`)."""

from .registry import (
    Encoder,
    EncoderError,
    available_encoders,
    encoder_from_identity,
    encoder_key,
    load_encoder,
    register_encoder,
    resolve_device,
    same_encoder,
)

__all__ = [
    "Encoder", "EncoderError", "available_encoders", "encoder_from_identity", "encoder_key", "load_encoder",
    "register_encoder", "resolve_device", "same_encoder",
]
