"""Generic and OME pyramidal TIFF (and plain TIFF) through tifffile.

Tiled levels are read by decoding exactly the tiles a region touches: raw tile bytes
come from ``os.pread`` (thread-safe, no shared file position) and are decoded by
tifffile's codecs (libjpeg-turbo via imagecodecs). Untiled levels fall back to
tifffile's zarr view, which decodes strips on demand.

Tiling reads many patches at once (:meth:`TiffBackend.read_patches`): each tile that
a patch touches is decoded once per call, and where a patch *is* a tile (same size,
aligned), an 8-bit RGB JPEG tile is decoded straight into the patch buffer with
libjpeg-turbo (which releases the GIL), with no intermediate copy. The pixels are the
same as :meth:`TiffBackend.read_region` gives: the same decoder with the same settings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import SlideError
from ..slide import LevelInfo
from ._common import check_rgb8, empty_rgb, level_dask, padded_read

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
        self._jpeg_into = self._make_jpeg_into(page)

    def _make_jpeg_into(self, page):
        """``decode(data, out)`` for 8-bit RGB JPEG tiles, as tifffile decodes them; else ``None``."""
        if not (page.compression == 7 and page.bitspersample == 8 and page.samplesperpixel == 3
                and page.planarconfig == 1 and not page.extrasamples):
            return None
        try:
            import imagecodecs
            from tifffile.tifffile import jpeg_decode_colorspace

            colorspace, outcolorspace = jpeg_decode_colorspace(page.photometric, page.planarconfig,
                                                               page.extrasamples, page.is_jfif)
        except Exception:  # pragma: no cover - other tifffile/imagecodecs versions
            return None
        decode, tables, shape = imagecodecs.jpeg8_decode, self.jpegtables, (self.th, self.tw)

        def into(data: bytes, out: np.ndarray) -> None:
            decode(data, tables=tables, colorspace=colorspace, outcolorspace=outcolorspace, shape=shape, out=out)

        return into

    def _raw(self, index: int) -> bytes | None:
        nbytes = self.counts[index]
        if nbytes == 0:
            return None
        data = os.pread(self.fd, nbytes, self.offsets[index])
        if len(data) != nbytes:
            raise SlideError(f"tile {index} is cut short; the file is truncated.")
        return data

    def tile_into(self, tx: int, ty: int, out: np.ndarray) -> None:
        """Decode tile (tx, ty) into ``out``, a C-contiguous (th, tw, 3) uint8 array."""
        if self._jpeg_into is not None:
            data = self._raw(ty * self.ntx + tx)
            if data is None:
                out[...] = 255
                return
            try:
                self._jpeg_into(data, out)
                return
            except Exception:
                pass  # let tifffile's decoder handle (or report) anything unusual
        out[...] = self.tile(tx, ty)

    def patches_are_tiles(self, xs: np.ndarray, ys: np.ndarray, size: int) -> bool:
        """Is every ``size``-px square at (``xs[i]``, ``ys[i]``) exactly one whole tile?"""
        return bool(len(xs) and size == self.tw == self.th and not (np.any(xs % self.tw) or np.any(ys % self.th))
                    and xs.min() >= 0 and ys.min() >= 0
                    and xs.max() + size <= self.width and ys.max() + size <= self.height)

    def read_patches(self, xs: np.ndarray, ys: np.ndarray, size: int, out: np.ndarray) -> None:
        """Fill ``out[i]`` with the ``size``-px square at (``xs[i]``, ``ys[i]``); white outside the image.

        Every tile is decoded at most once per call.
        """
        tw, th = self.tw, self.th
        n = len(xs)
        if n == 0:
            return
        if self.patches_are_tiles(xs, ys, size):
            for i in range(n):  # a patch is a tile: decode in place
                self.tile_into(int(xs[i]) // tw, int(ys[i]) // th, out[i])
            return
        cache: dict[tuple[int, int], np.ndarray] = {}
        for i in range(n):
            x0, y0 = int(xs[i]), int(ys[i])
            x1, y1 = x0 + size, y0 + size
            cx0, cy0 = max(0, x0), max(0, y0)
            cx1, cy1 = min(self.width, x1), min(self.height, y1)
            if cx0 > x0 or cy0 > y0 or cx1 < x1 or cy1 < y1:
                out[i] = 255
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            for ty in range(cy0 // th, (cy1 - 1) // th + 1):
                for tx in range(cx0 // tw, (cx1 - 1) // tw + 1):
                    t = cache.get((tx, ty))
                    if t is None:
                        t = empty_rgb((th, tw, 3))
                        self.tile_into(tx, ty, t)
                        cache[(tx, ty)] = t
                    gx0, gy0 = tx * tw, ty * th
                    sx0, sy0 = max(cx0, gx0), max(cy0, gy0)
                    sx1, sy1 = min(cx1, gx0 + tw), min(cy1, gy0 + th)
                    out[i, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = t[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]

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
        t = empty_rgb((self.th, self.tw, 3))  # each tile decoded here, then copied (see empty_rgb)
        for ty in range(y0 // self.th, (y1 - 1) // self.th + 1):
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1):
                self.tile_into(tx, ty, t)
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

    def read_patches(self, level: int, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
        """``(n, size, size, 3)`` uint8: the squares at ``(xs[i], ys[i])`` (pixels of ``level``).

        Equal to ``read_region(level, xs[i], ys[i], size, size)`` for each ``i``, but decodes
        each tile once, and decodes tiles that are patches straight into the result.
        """
        out = empty_rgb((len(xs), size, size, 3))  # decoded into at once where patches are tiles
        reader = self._readers[level]
        if isinstance(reader, _TiledLevel):
            reader.read_patches(np.asarray(xs, np.int64), np.asarray(ys, np.int64), size, out)
        elif len(xs):  # untiled: one region read over all of them
            x0, y0 = int(np.min(xs)), int(np.min(ys))
            region = self.read_region(level, x0, y0, int(np.max(xs)) + size - x0, int(np.max(ys)) + size - y0)
            for i, (x, y) in enumerate(zip(xs, ys)):
                out[i] = region[int(y) - y0 : int(y) - y0 + size, int(x) - x0 : int(x) - x0 + size]
        return out

    def iter_patches(self, level: int, xs: np.ndarray, ys: np.ndarray, size: int) -> Iterator[np.ndarray]:
        """The patches of :meth:`read_patches` one at a time. Where patches are whole JPEG
        tiles, each is decoded into one reused buffer (still in the CPU's cache when the
        caller writes it out): a patch is valid until the next one is asked for."""
        xs, ys = np.asarray(xs, np.int64), np.asarray(ys, np.int64)
        reader = self._readers[level]
        if isinstance(reader, _TiledLevel) and reader.patches_are_tiles(xs, ys, size):
            buf = empty_rgb((size, size, 3))
            for x, y in zip(xs.tolist(), ys.tolist()):
                reader.tile_into(x // reader.tw, y // reader.th, buf)
                yield buf
            return
        yield from self.read_patches(level, xs, ys, size)

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
