"""Headless engine of napari-protodiff.

Nothing in this package may import napari, Qt or magicgui (a test enforces it), so
everything here runs in scripts, the CLI, cluster jobs and tests without a display.
Heavy optional dependencies (torch, diffusers) are imported lazily inside functions.
"""

from .errors import ProtodiffError

__all__ = ["ProtodiffError"]
