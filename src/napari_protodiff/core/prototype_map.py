"""One slide's prototype map: a label image on the patch grid, with its pixel size.

Each pixel of the map is one grid cell (one patch footprint) of the slide: 0 where no
patch was kept, ``prototype + 1`` elsewhere. Its pixel size is the patch footprint in
µm, and its origin is the slide's top-left corner, so in napari it overlays the slide
(opened in µm) with ``scale=(pixel_size_um, pixel_size_um)``.

Exports: OME-TIFF (``.tif``/``.tiff``, physical pixel size in the OME-XML), OME-Zarr
(``.zarr``, NGFF 0.5 with a scale transform and label colours), and a PNG overlay of
the map on the slide's thumbnail (or on the stored patches when the slide file is gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ProtodiffError
from .prototypes import load_prototypes, slide_assignments
from .store import PatchStore


@dataclass
class LabelImage:
    labels: np.ndarray
    """(rows, cols) uint16: 0 background, prototype + 1 elsewhere."""
    pixel_size_um: float
    footprint_px: float
    """Side of one map pixel in slide level-0 pixels."""
    k: int
    slide_id: str
    colors: np.ndarray
    """(k, 3) uint8 colour of each prototype."""

    def to_dict(self) -> dict[str, Any]:
        return {"slide_id": self.slide_id, "shape": list(self.labels.shape), "pixel_size_um": self.pixel_size_um,
                "footprint_px": self.footprint_px, "k": self.k}


def palette(k: int) -> np.ndarray:
    """``k`` distinct, deterministic colours (uint8 RGB)."""
    base = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
                     [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [174, 199, 232], [255, 187, 120],
                     [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148], [247, 182, 210],
                     [199, 199, 199], [219, 219, 141], [158, 218, 229]], np.uint8)
    if k <= len(base):
        return base[:k].copy()
    import colorsys

    extra = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.9) for i in range(k - len(base))]
    return np.vstack([base, (np.array(extra) * 255).round().astype(np.uint8)])


def prototype_label_image(store: str | Path | PatchStore, slide_id: str) -> LabelImage:
    """The prototype map of ``slide_id`` (see the module docstring)."""
    st = store if isinstance(store, PatchStore) else PatchStore(store)
    entry = st.slide(slide_id)
    protos = load_prototypes(st)
    labels, _ = slide_assignments(st, slide_id)
    a = entry.attrs
    fp = float(a["footprint_level0"])
    rows, cols = (int(v) for v in a["grid_shape"])
    coords = entry.coords()
    r = np.round(coords[:, 1] / fp).astype(np.int64)
    c = np.round(coords[:, 0] / fp).astype(np.int64)
    img = np.zeros((rows, cols), np.uint16)
    img[np.clip(r, 0, rows - 1), np.clip(c, 0, cols - 1)] = labels.astype(np.uint16) + 1
    mpp = a.get("slide_mpp") or (a.get("patch_mpp", st.mpp) * a.get("patch_size", st.patch_size) / fp)
    return LabelImage(img, float(fp * mpp), fp, protos.k, slide_id, palette(protos.k))


def write_label_image(li: LabelImage, path: str | Path) -> Path:
    """Write the map as OME-TIFF (``.tif``/``.tiff``) or OME-Zarr (``.zarr``)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".tif", ".tiff")):
        import tifffile

        ps = li.pixel_size_um
        tifffile.imwrite(p, li.labels, ome=True, photometric="minisblack", resolution=(1e4 / ps, 1e4 / ps),
                         resolutionunit="CENTIMETER",
                         metadata={"axes": "YX", "PhysicalSizeX": ps, "PhysicalSizeXUnit": "µm",
                                   "PhysicalSizeY": ps, "PhysicalSizeYUnit": "µm", "Name": f"{li.slide_id} prototypes"})
        return p
    if name.endswith(".zarr"):
        import zarr

        g = zarr.open_group(str(p), mode="w", zarr_format=3)
        g.create_array("0", data=li.labels, chunks=(min(1024, li.labels.shape[0]), min(1024, li.labels.shape[1])),
                       dimension_names=("y", "x"))
        colors = [{"label-value": j + 1, "rgba": [int(v) for v in li.colors[j]] + [255]} for j in range(li.k)]
        g.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [{"name": f"{li.slide_id} prototypes",
                             "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                                      {"name": "x", "type": "space", "unit": "micrometer"}],
                             "datasets": [{"path": "0", "coordinateTransformations": [
                                 {"type": "scale", "scale": [li.pixel_size_um, li.pixel_size_um]}]}]}],
            "image-label": {"version": "0.5", "colors": colors},
        }
        return p
    raise ProtodiffError(f"{p}: choose a .tif/.tiff (OME-TIFF) or .zarr (OME-Zarr) file name for the prototype map.")


def overlay_background(st: PatchStore, slide_id: str, max_side: int = 1600) -> tuple[np.ndarray, float]:
    """(RGB thumbnail, downsample from level 0): from the slide file, or from the stored patches."""
    entry = st.slide(slide_id)
    a = entry.attrs
    w0, h0 = (int(v) for v in a["dimensions"])
    ds = max(1.0, max(w0, h0) / max_side)
    path = a.get("path")
    if path and Path(path).exists():
        try:
            from .slide import open_slide

            with open_slide(path, mpp_override=(a.get("params") or {}).get("mpp_override")) as s:
                return s.read_downsampled(ds)
        except ProtodiffError:
            pass
    # No slide file: paint each stored patch, downscaled, into its place.
    from PIL import Image

    canvas = np.full((int(np.ceil(h0 / ds)), int(np.ceil(w0 / ds)), 3), 245, np.uint8)
    fp = float(a["footprint_level0"])
    side = max(1, int(round(fp / ds)))
    pats = entry.group["patches"]
    run = (getattr(pats, "shards", None) or (256,))[0]  # read whole shards (or runs of 256): one patch at a time is slow in zarr
    block, start = None, 0
    for i, (x, y) in enumerate(entry.coords()):
        if block is None or i >= start + len(block):
            start = i
            block = np.asarray(pats[i : i + run])
        tile = np.asarray(Image.fromarray(block[i - start]).resize((side, side), Image.Resampling.BILINEAR))
        y0, x0 = int(y / ds), int(x / ds)
        hh, ww = canvas[y0:y0 + side, x0:x0 + side].shape[:2]
        canvas[y0:y0 + hh, x0:x0 + ww] = tile[:hh, :ww]
    return canvas, ds


def export_prototype_map(store: str | Path, slide_id: str, output: str | Path | None = None,
                         png: str | Path | None = None) -> dict[str, Any]:
    """Write ``slide_id``'s map (OME-TIFF/OME-Zarr) and/or its PNG overlay; returns what was written."""
    from .figures import prototype_overlay_png

    st = PatchStore(store)
    if output is None and png is None:
        raise ProtodiffError("Nothing to write: give an output file (.tif or .zarr) and/or --png FILE.")
    li = prototype_label_image(st, slide_id)
    out: dict[str, Any] = li.to_dict()
    if output is not None:
        out["map"] = str(write_label_image(li, output))
    if png is not None:
        rgb, ds = overlay_background(st, slide_id)
        out["png"] = str(prototype_overlay_png(rgb, ds, li.labels, li.footprint_px, li.colors, png))
    return out
