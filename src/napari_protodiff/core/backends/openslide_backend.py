"""OpenSlide formats: Aperio SVS, Hamamatsu NDPI/VMS, MIRAX, Leica SCN, Philips TIFF,
Ventana BIF, DICOM WSI, Sakura and generic tiled TIFF (openslide-python + openslide-bin)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlideError
from ..slide import LevelInfo
from ._common import level_dask


def _openslide():
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise SlideError(f"OpenSlide is not available ({exc}); install openslide-python and openslide-bin.") from exc
    return openslide


def detect_vendor(path: Path) -> str | None:
    try:
        return _openslide().OpenSlide.detect_format(str(path))
    except Exception:
        return None


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA; transparent (no-data) areas become white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint16) + (255 - alpha[..., None].astype(np.uint16))
    return np.minimum(out, 255).astype(np.uint8)


class OpenSlideBackend:
    name = "openslide"

    def __init__(self, path: Path) -> None:
        openslide = _openslide()
        self.path = path
        if path.is_dir():  # a DICOM WSI series folder: OpenSlide takes any of its files
            path = min(path.glob("*.dcm"))
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(f"{path}: not a slide OpenSlide can read (unsupported or damaged file).") from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path}: OpenSlide cannot read this slide ({exc}); the file may be truncated or damaged.") from exc
        props = self._osr.properties
        self._levels = []
        for i, (w, h) in enumerate(self._osr.level_dimensions):
            tw = int(props.get(f"openslide.level[{i}].tile-width", 256))
            th = int(props.get(f"openslide.level[{i}].tile-height", 256))
            self._levels.append(LevelInfo(int(w), int(h), float(self._osr.level_downsamples[i]), tw, th))
        # Touch the first tile so truncated files fail here, not in the middle of a job.
        try:
            self._osr.read_region((0, 0), len(self._levels) - 1, (1, 1))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path}: OpenSlide cannot decode this slide ({exc}); the file may be truncated.") from exc

    def levels(self) -> list[LevelInfo]:
        return self._levels

    def metadata(self) -> dict:
        p = self._osr.properties

        def num(key):
            try:
                return float(p[key])
            except (KeyError, ValueError):
                return None

        return {
            "mpp_x": num("openslide.mpp-x"),
            "mpp_y": num("openslide.mpp-y"),
            "objective_power": num("openslide.objective-power"),
            "vendor": p.get("openslide.vendor"),
            "properties": dict(p),
        }

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._levels[level].downsample
        # OpenSlide takes the top-left corner in level-0 coordinates.
        x0, y0 = int(round(x * ds)), int(round(y * ds))
        try:
            rgba = np.asarray(self._osr.read_region((x0, y0), level, (w, h)))
        except _openslide().OpenSlideError as exc:
            raise SlideError(f"{self.path}: OpenSlide failed to read a region ({exc}); the file may be damaged.") from exc
        return rgba_to_rgb(rgba)

    def level_dask(self, level: int):
        return level_dask(self, level)

    def associated_image_names(self) -> list[str]:
        return list(self._osr.associated_images.keys())

    def associated_image(self, name: str) -> np.ndarray:
        return rgba_to_rgb(np.asarray(self._osr.associated_images[name].convert("RGBA")))

    def close(self) -> None:
        self._osr.close()
