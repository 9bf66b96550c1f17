"""Plain PNG and JPEG images (one level) through Pillow.

They carry no reliable pixel size (a DPI tag is about printing, not microscopy), so
their mpp is reported as missing unless overridden.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlideError
from ..slide import LevelInfo
from ._common import check_rgb8, level_dask, padded_read

_MODES = {"L": (np.uint8, 1), "LA": (np.uint8, 2), "P": (np.uint8, 3), "RGB": (np.uint8, 3),
          "RGBA": (np.uint8, 4), "I;16": (np.uint16, 1), "I;16B": (np.uint16, 1), "I": (np.int32, 1),
          "F": (np.float32, 1), "CMYK": (np.uint8, 4), "1": (np.uint8, 1)}


class ImageBackend:
    name = "image"

    def __init__(self, path: Path) -> None:
        from PIL import Image, UnidentifiedImageError

        self.path = path
        Image.MAX_IMAGE_PIXELS = None  # slides are large on purpose
        try:
            with Image.open(path) as im:
                mode = im.mode
                if mode in ("RGBA", "LA") and im.getextrema()[-1][0] == 255:
                    mode = "RGB"  # fully opaque alpha carries nothing
                dtype, samples = _MODES.get(mode, (np.uint8, 0))
                if mode == "P":
                    im = im.convert("RGB")
                if mode == "LA":
                    samples = 1
                check_rgb8(path, dtype, samples)
                im.load()
                self._img = np.ascontiguousarray(np.asarray(im.convert("RGB")))
        except SlideError:
            raise
        except UnidentifiedImageError as exc:
            raise SlideError(f"{path}: not an image Pillow can read (unknown format or damaged file).") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise SlideError(f"{path}: cannot decode the image ({exc}); the file may be truncated or damaged.") from exc
        h, w = self._img.shape[:2]
        self._levels = [LevelInfo(w, h, 1.0, min(w, 1024), min(h, 1024))]

    def levels(self) -> list[LevelInfo]:
        return self._levels

    def metadata(self) -> dict:
        return {"mpp_x": None, "mpp_y": None, "objective_power": None, "vendor": None, "properties": {}}

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        return padded_read(lambda x0, y0, x1, y1: self._img[y0:y1, x0:x1], lv.width, lv.height, x, y, w, h)

    def level_dask(self, level: int):
        return level_dask(self, level)

    def associated_image_names(self) -> list[str]:
        return []

    def associated_image(self, name: str) -> np.ndarray:  # pragma: no cover - none exist
        raise KeyError(name)

    def close(self) -> None:
        pass
