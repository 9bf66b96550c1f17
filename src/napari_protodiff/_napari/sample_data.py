"""npe2 sample data: the bundled CMU-1-Small-Region slide (Aperio SVS, CC0)."""

from __future__ import annotations


def cmu_small_region() -> list:
    """The bundled sample slide as one RGB image layer in µm (see :mod:`.reader`)."""
    from ..data import SAMPLE_SLIDE
    from .reader import slide_layer_data

    return [slide_layer_data(SAMPLE_SLIDE)]
