"""Attention maps of an ABMIL evaluation, saved next to its results for napari.

Layout (zarr format 3, in a run directory's ``outputs/``)::

    attention.zarr/                  attrs["protodiff"] = {kind: "attention", task, encoder, slides: [...]}
      <slide_id>/                    attrs["protodiff"] = {patient, fold, slide_path, footprint_level0,
                                                          slide_mpp, patch_mpp, prediction}
        attention  (N,) float32      softmax attention of each patch (sums to 1 over the slide)
        coords     (N, 2) int64      level-0 (x, y) of each patch's top-left corner, as in the patch store

A patch ``i`` covers level-0 pixels ``coords[i] .. coords[i] + footprint_level0``, so the
map can be drawn over the slide exactly like the prototype overlay.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EvaluationError

KIND = "attention"


def write_attention(path: str | Path, bags, result) -> Path:
    """Write every slide's out-of-fold attention (atomically: a temporary folder renamed at the end)."""
    import zarr

    out = Path(path)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for i, b in enumerate(bags):
        g = root.create_group(b.slide_id)
        att = np.asarray(result.attention[i], np.float32)
        g.create_array("attention", data=att, chunks=(max(1, len(att)),))
        coords = b.coords if b.coords is not None else np.zeros((len(att), 2), np.int64)
        g.create_array("coords", data=np.asarray(coords, np.int64), chunks=(max(1, len(att)), 2))
        pred = result.predictions[i]
        g.attrs["protodiff"] = {"patient": b.patient, "fold": int(result.fold[i]),
                                "prediction": np.asarray(pred, float).tolist(),
                                **{k: v for k, v in b.meta.items() if k in ("slide_path", "footprint_level0", "slide_mpp",
                                                                            "patch_mpp")}}
    root.attrs["protodiff"] = {"kind": KIND, "task": result.task, "classes": result.classes, "encoder": result.encoder,
                               "slides": [b.slide_id for b in bags]}
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@dataclass
class AttentionMap:
    slide_id: str
    attention: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]

    @property
    def footprint(self) -> float | None:
        f = self.attrs.get("footprint_level0")
        return None if f is None else float(f)


def read_attention(path: str | Path, slide: str | None = None) -> list[AttentionMap]:
    """Attention maps in ``path`` (an ``attention.zarr`` or the run directory holding it); one slide or all."""
    import zarr

    p = Path(path)
    for cand in (p, p / "attention.zarr", p / "outputs" / "attention.zarr"):
        if (cand / "zarr.json").is_file():
            p = cand
            break
    else:
        raise EvaluationError(f"{path}: no attention maps there (expected an attention.zarr from protodiff evaluate mil).")
    root = zarr.open_group(str(p), mode="r")
    meta = dict(root.attrs.get("protodiff", {}))
    if meta.get("kind") != KIND:
        raise EvaluationError(f"{p}: a zarr group but not protodiff attention maps.")
    ids = meta.get("slides", [])
    if slide is not None:
        from ..store import slide_id_from_path

        want = [s for s in ids if s == slide or s == slide_id_from_path(slide)
                or Path(str(root[s].attrs.get("protodiff", {}).get("slide_path", ""))).name == Path(slide).name]
        if not want:
            raise EvaluationError(f"{p}: no attention map for slide '{slide}' (it has {', '.join(ids[:5])}...).")
        ids = want[:1]
    return [AttentionMap(s, np.asarray(root[s]["attention"][:]), np.asarray(root[s]["coords"][:]),
                         dict(root[s].attrs.get("protodiff", {}))) for s in ids]


def attention_grid(m: AttentionMap, normalise: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """The map as an image with one pixel per patch cell: (grid (rows, cols) float32, NaN off-tissue; origin (x0, y0) level-0).

    With ``normalise`` the attention is multiplied by the number of patches, so 1 is
    "average attention" whatever the slide's size.
    """
    f = m.footprint
    if f is None or f <= 0:
        raise EvaluationError(f"Slide '{m.slide_id}': its attention map has no patch footprint; cannot place it on the slide.")
    c = m.coords.astype(float)
    x0, y0 = c[:, 0].min(), c[:, 1].min()
    col = np.rint((c[:, 0] - x0) / f).astype(int)
    row = np.rint((c[:, 1] - y0) / f).astype(int)
    grid = np.full((row.max() + 1, col.max() + 1), np.nan, np.float32)
    a = m.attention * (len(m.attention) if normalise else 1.0)
    grid[row, col] = a
    return grid, (int(x0), int(y0))
