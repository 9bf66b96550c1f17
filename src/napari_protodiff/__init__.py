"""napari-protodiff: prototype-guided diffusion for digital pathology.

The headless engine lives in :mod:`napari_protodiff.core` (never imports napari or
Qt); the ``protodiff`` command in :mod:`napari_protodiff.cli`; napari contributions
(reader, sample data, dock widgets) in :mod:`napari_protodiff._napari`.
"""

from ._version import __version__

__all__ = ["__version__"]
