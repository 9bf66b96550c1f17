"""npe2 reader: a whole-slide image as one lazy, multiscale RGB image layer in µm.

The layer's ``scale`` is the level-0 pixel size and its ``units`` are µm, so napari's
scale bar is physical. A slide whose pixel size is missing or implausible opens in
pixel units with a warning (never a guessed size); give the real size with the Slides
widget's mpp override (or :func:`slide_layer_data` with ``mpp_override``).
Imports of the core happen inside the functions so napari starts fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

#: Metadata key marking a layer as a slide opened by this plugin.
SLIDE_KEY = "protodiff_slide"

LayerData = tuple[Any, dict[str, Any], str]


def pixel_units_message(name: str, problem: str | None) -> str:
    """The sentence shown when a slide opens without a physical pixel size."""
    return (
        f"{name}: {problem or 'the pixel size is unknown'}; opened in pixel units. "
        "Set the real pixel size (µm/px) with the mpp override in the Slides widget."
    )


def slide_layer_data(path: str | os.PathLike, mpp_override: float | None = None) -> LayerData:
    """Layer data ``(pyramid, kwargs, "image")`` for the slide at ``path``.

    Raises :class:`~napari_protodiff.core.errors.ProtodiffError` (one sentence) on bad
    input. ``kwargs["metadata"]`` holds the path, the override, the slide info and, if
    the slide has no usable pixel size, the warning in ``"units_warning"``.
    """
    from ..core.slide import open_slide

    slide = open_slide(path, mpp_override=mpp_override)  # stays open: the dask arrays read from it
    info, pyramid = slide.info, slide.pyramid()
    mpp = info.mpp
    warning = None if mpp is not None else pixel_units_message(Path(path).name, info.mpp_problem)
    metadata = {
        SLIDE_KEY: True,
        "path": str(Path(path).resolve()),
        "mpp_override": mpp_override,
        "slide_info": info.to_dict(),
        "units_warning": warning,
    }
    kwargs = {
        "name": Path(path).name,
        "rgb": True,
        "multiscale": len(pyramid) > 1,
        "contrast_limits": (0, 255),
        "scale": (mpp, mpp) if mpp is not None else (1.0, 1.0),
        "units": ("µm", "µm") if mpp is not None else ("pixel", "pixel"),
        "metadata": metadata,
    }
    return (pyramid if len(pyramid) > 1 else pyramid[0]), kwargs, "image"


def _supported(path: str) -> bool:
    from ..core.slide import SUPPORTED_EXTENSIONS

    p = Path(path)
    if p.is_dir():
        if next(p.glob("*.dcm"), None) is not None:
            return True  # a DICOM WSI series folder
        if p.suffix.lower() != ".zarr" and not any((p / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup")):
            return False
        from ..core.store import PatchStore

        return not PatchStore.is_store(p)  # a patch store is not a slide
    return p.suffix.lower() in SUPPORTED_EXTENSIONS


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list] | None:
    """Return :func:`read_slides` if ``path`` looks like a slide this plugin opens, else ``None``."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_supported(os.fspath(p)) for p in paths):
        return None
    return read_slides


def read_slides(path: str | list[str]) -> list:
    """Read one or more slides; a slide that fails becomes an error notification, not a traceback."""
    from napari.utils.notifications import show_error, show_warning

    from ..core.errors import ProtodiffError

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out: list = []
    for p in paths:
        try:
            data, kwargs, kind = slide_layer_data(p)
        except ProtodiffError as exc:
            show_error(str(exc))
            continue
        if kwargs["metadata"]["units_warning"]:
            show_warning(kwargs["metadata"]["units_warning"])
        out.append((data, kwargs, kind))
    # napari's "read but nothing to add" sentinel: the notification already said why.
    return out or [(None,)]
