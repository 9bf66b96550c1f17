"""OME-Zarr (NGFF 0.4 on zarr v2 and 0.5 on zarr v3) multiscale images, read with zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlideError
from ..slide import LevelInfo
from ._common import check_rgb8, padded_read

_UNIT_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}


class OmeZarrBackend:
    name = "omezarr"

    def __init__(self, path: Path) -> None:
        import zarr

        self.path = path
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as exc:
            raise SlideError(f"{path}: not a readable zarr group ({exc}).") from exc
        attrs = dict(group.attrs)
        ms = (attrs.get("ome") or attrs).get("multiscales")
        if not ms:
            raise SlideError(f"{path}: a zarr group without OME-Zarr 'multiscales' metadata is not an image.")
        ms = ms[0]
        axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", ["t", "c", "z", "y", "x"])]
        units = {a["name"]: a.get("unit") for a in ms.get("axes", []) if isinstance(a, dict)}
        self._arrays = [group[d["path"]] for d in ms["datasets"]]
        self._axes = axes
        if "y" not in axes or "x" not in axes:
            raise SlideError(f"{path}: OME-Zarr axes {axes} have no y and x.")
        nchan = self._arrays[0].shape[axes.index("c")] if "c" in axes else 1
        check_rgb8(path, self._arrays[0].dtype, nchan)
        # Scale of level 0 from its coordinateTransformations.
        self._mpp = None
        for t in ms["datasets"][0].get("coordinateTransformations", []):
            if t.get("type") == "scale":
                sy, sx = t["scale"][axes.index("y")], t["scale"][axes.index("x")]
                unit = _UNIT_UM.get(units.get("x") or "")
                if unit:
                    self._mpp = (sx * unit, sy * unit)
        iy, ix = axes.index("y"), axes.index("x")
        w0 = self._arrays[0].shape[ix]
        self._levels = []
        for a in self._arrays:
            h, w = a.shape[iy], a.shape[ix]
            ch, cw = a.chunks[iy], a.chunks[ix]
            self._levels.append(LevelInfo(int(w), int(h), w0 / w, int(cw), int(ch)))

    def _index(self, level: int, y0: int, y1: int, x0: int, x1: int):
        key = []
        for ax in self._axes:
            key.append({"y": slice(y0, y1), "x": slice(x0, x1), "c": slice(None)}.get(ax, 0))
        return tuple(key)

    def _to_yxc(self, arr: np.ndarray) -> np.ndarray:
        kept = [ax for ax in self._axes if ax in ("y", "x", "c")]
        return np.moveaxis(arr, [kept.index("y"), kept.index("x"), kept.index("c")], [0, 1, 2])

    def levels(self) -> list[LevelInfo]:
        return self._levels

    def metadata(self) -> dict:
        mx, my = self._mpp if self._mpp else (None, None)
        return {"mpp_x": mx, "mpp_y": my, "objective_power": None, "vendor": "ome-zarr", "properties": {}}

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        arr = self._arrays[level]

        def read(x0, y0, x1, y1):
            return self._to_yxc(np.asarray(arr[self._index(level, y0, y1, x0, x1)]))

        return padded_read(read, lv.width, lv.height, x, y, w, h)

    def level_dask(self, level: int):
        import dask.array as da

        a = da.from_zarr(self._arrays[level])
        a = a[self._index(level, None, None, None, None)]
        return self._to_yxc(a) if isinstance(a, np.ndarray) else da.moveaxis(
            a, *self._moves()
        )

    def _moves(self):
        kept = [ax for ax in self._axes if ax in ("y", "x", "c")]
        return [kept.index("y"), kept.index("x"), kept.index("c")], [0, 1, 2]

    def associated_image_names(self) -> list[str]:
        return []

    def associated_image(self, name: str) -> np.ndarray:  # pragma: no cover - none exist
        raise KeyError(name)

    def close(self) -> None:
        pass
