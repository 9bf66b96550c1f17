"""Generic and OME pyramidal TIFF (and plain TIFF) through tifffile.

Tiled levels are read by decoding exactly the tiles a region touches: raw tile bytes
come from ``os.pread`` (thread-safe, no shared file position) and are decoded by
tifffile's codecs (libjpeg-turbo via imagecodecs). Untiled levels fall back to
tifffile's zarr view, which decodes strips on demand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import SlideError
from ..slide import LevelInfo
from ._common import check_rgb8, level_dask, padded_read

_RES_UNIT_UM = {2: 25400.0, 3: 10000.0}  # inch, centimetre (tifffile RESUNIT values)
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


class _TiledLevel:
    """Region reads on one tiled TIFF page by decoding only the tiles needed."""

    def __init__(self, page, fd: int) -> None:
        self.page = page
        self.fd = fd
        self.tw, self.th = int(page.tilewidth), int(page.tilelength)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.ntx = -(-self.width // self.tw)
        self.offsets = page.dataoffsets
        self.counts = page.databytecounts
        self.jpegtables = page.jpegtables
        self.decode = page.decode

    def tile(self, tx: int, ty: int) -> np.ndarray:
        index = ty * self.ntx + tx
        nbytes = self.counts[index]
        if nbytes == 0:
            return np.full((self.th, self.tw, 3), 255, np.uint8)
        data = os.pread(self.fd, nbytes, self.offsets[index])
        if len(data) != nbytes:
            raise SlideError(f"tile {index} is cut short; the file is truncated.")
        seg = self.decode(data, index, jpegtables=self.jpegtables)[0]
        return seg.reshape(seg.shape[-3:])

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for ty in range(y0 // self.th, (y1 - 1) // self.th + 1):
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1):
                t = self.tile(tx, ty)
                gx0, gy0 = tx * self.tw, ty * self.th
                sx0, sy0 = max(x0, gx0), max(y0, gy0)
                sx1, sy1 = min(x1, gx0 + self.tw), min(y1, gy0 + self.th)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = t[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]
        return out


class _ZarrLevel:
    """Fallback for untiled or planar pages: tifffile's zarr view (decodes on demand)."""

    def __init__(self, level_series, planar: bool) -> None:
        import zarr

        self._z = zarr.open(level_series.aszarr(), mode="r")
        self.planar = planar

    def read(self, x0, y0, x1, y1):
        if self.planar:
            return np.moveaxis(np.asarray(self._z[:, y0:y1, x0:x1]), 0, -1)
        return np.asarray(self._z[y0:y1, x0:x1])


class TiffBackend:
    name = "tiff"

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            page = series.levels[0].keyframe
        except Exception as exc:
            raise SlideError(f"{path}: not a readable TIFF ({exc}).") from exc
        axes = series.axes
        planar = axes.startswith("C") or axes.startswith("S")
        samples = page.samplesperpixel if not planar else series.shape[0]
        check_rgb8(path, page.dtype, samples if axes not in ("YX",) else 1)
        self._series = series
        self._fd = os.open(str(path), os.O_RDONLY)
        self._readers = []
        self._levels = []
        w0 = series.levels[0].shape[1 if not planar else 2]
        for lvl in series.levels:
            kp = lvl.keyframe
            w, h = int(kp.imagewidth), int(kp.imagelength)
            tiled = kp.is_tiled and kp.planarconfig == 1 and not planar and len(lvl.pages) == 1
            if tiled:
                reader = _TiledLevel(kp, self._fd)
                tw, th = reader.tw, reader.th
            else:
                reader = _ZarrLevel(lvl, planar)
                tw, th = w, int(kp.rowsperstrip or h) if not kp.is_tiled else kp.tilelength
                tw, th = min(tw, 1024), max(1, min(th, 1024))
            self._readers.append(reader)
            self._levels.append(LevelInfo(w, h, w0 / w, int(tw), int(th)))
        self._check_decodes()

    def _check_decodes(self) -> None:
        lv = self._levels[-1]
        try:
            self.read_region(len(self._levels) - 1, 0, 0, min(lv.width, 16), min(lv.height, 16))
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"{self.path}: cannot decode image data ({exc}); the file may be truncated or damaged.") from exc

    def levels(self) -> list[LevelInfo]:
        return self._levels

    def metadata(self) -> dict:
        tif, page = self._tif, self._series.levels[0].keyframe
        meta: dict = {"vendor": "ome" if tif.is_ome else "generic-tiff", "objective_power": None, "properties": {}}
        mx = my = None
        if tif.is_ome:
            xml = tif.ome_metadata or ""
            m = re.search(r"<Pixels\b[^>]*>", xml)
            if m:
                attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
                unit = _OME_UNIT_UM.get(attrs.get("PhysicalSizeXUnit", "µm"))
                if "PhysicalSizeX" in attrs and unit:
                    mx = float(attrs["PhysicalSizeX"]) * unit
                    my = float(attrs.get("PhysicalSizeY", attrs["PhysicalSizeX"])) * unit
            m = re.search(r'NominalMagnification="([0-9.]+)"', xml)
            if m:
                meta["objective_power"] = float(m.group(1))
        if mx is None:
            unit = _RES_UNIT_UM.get(int(page.resolutionunit))
            rx, ry = page.resolution
            if unit and rx > 0 and ry > 0:
                mx, my = unit / rx, unit / ry
        meta["mpp_x"], meta["mpp_y"] = mx, my
        desc = page.description or ""
        if desc and not tif.is_ome:
            meta["properties"]["tiff.ImageDescription"] = desc[:2000]
        if page.software:
            meta["properties"]["tiff.Software"] = str(page.software)
        return meta

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        reader = self._readers[level]
        return padded_read(reader.read, lv.width, lv.height, x, y, w, h)

    def level_dask(self, level: int):
        return level_dask(self, level)

    def _associated(self) -> dict:
        out = {}
        for s in self._tif.series[1:]:
            name = (s.name or "").lower()
            for key in ("label", "macro", "thumbnail"):
                if key in name:
                    out[key] = s
        return out

    def associated_image_names(self) -> list[str]:
        return list(self._associated())

    def associated_image(self, name: str) -> np.ndarray:
        img = self._associated()[name].asarray()
        return img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._tif.close()
