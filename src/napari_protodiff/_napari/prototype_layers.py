"""Layer data of prototypes: the per-patch prototype map over a slide, and an exemplar gallery.

No Qt here and no numerics of the method: the map comes from
:func:`~napari_protodiff.core.prototype_map.prototype_label_image` (one pixel per patch
grid cell, ``prototype + 1``, 0 where there is no patch) and is aligned to the slide
layer with :func:`.overlays.aligned`: grid cell ``(r, c)`` covers level-0 pixels
``[c*fp, (c+1)*fp) x [r*fp, (r+1)*fp)`` (``fp`` the patch footprint in level-0 pixels,
not necessarily an integer for resampled stores), so its edges are the slide's level-0
pixel edges in the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .overlays import OVERLAY_KEY, SlideFrame, aligned

#: ``metadata[OVERLAY_KEY]`` of the prototype map and of the exemplar gallery.
PROTOTYPES, GALLERY = "prototypes", "prototype-gallery"


@dataclass(frozen=True)
class StoreSlide:
    """What the widget needs of one slide in a store (plain values)."""

    store: str
    slide_id: str
    path: str | None
    """The slide file it was tiled from (resolved), or ``None`` if the store does not say."""
    mpp_override: float | None
    dimensions: tuple[int, int]
    """Level-0 (width, height)."""
    slide_mpp: float | None
    footprint: float
    patch_size: int
    n_patches: int


def store_slides(store: str | Path) -> list[StoreSlide]:
    """The completely tiled slides of a patch store (raises the core's one-sentence errors)."""
    from ..core.store import PatchStore

    st = PatchStore(store)
    out = []
    for e in st.slides():
        a = e.attrs
        out.append(StoreSlide(
            store=str(st.path), slide_id=e.slide_id, path=a.get("path"),
            mpp_override=(a.get("params") or {}).get("mpp_override"),
            dimensions=tuple(int(v) for v in a["dimensions"]), slide_mpp=a.get("slide_mpp"),
            footprint=float(a["footprint_level0"]), patch_size=int(a.get("patch_size", st.patch_size)),
            n_patches=e.n_patches,
        ))
    return out


def same_file(a: str | None, b: str | None) -> bool:
    """Whether two paths name the same file (resolved)."""
    if not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def frame_without_slide(s: StoreSlide) -> SlideFrame:
    """A frame for a slide whose file is not open: level 0 at the origin, in µm if the store knows the pixel size."""
    mpp = s.slide_mpp
    return SlideFrame(s.slide_id, s.path or "", (mpp or 1.0,) * 2, (0.0, 0.0),
                      ("µm", "µm") if mpp else ("pixel", "pixel"))


def rgba(color: Sequence[int], alpha: float = 1.0) -> tuple[float, float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255, alpha)


def colormap(colors: np.ndarray, hidden: Iterable[int] = ()) -> dict[Any, Any]:
    """A direct label colormap: prototype ``j`` (label ``j + 1``) in ``colors[j]``, hidden ones transparent."""
    off = set(hidden)
    cmap: dict[Any, Any] = {None: "transparent", 0: "transparent"}
    for j, c in enumerate(colors):
        cmap[j + 1] = rgba(c, 0.0 if j in off else 1.0)
    return cmap


def prototype_layer_data(store: str | Path, slide_id: str, frame: SlideFrame,
                         hidden: Iterable[int] = ()) -> tuple[np.ndarray, dict[str, Any], str]:
    """Labels layer data of ``slide_id``'s prototype map, aligned to the slide in ``frame``.

    ``layer.features`` has one row per prototype (``index`` = its label value): the
    prototype, its patch count and share in this slide and its patch count in the store.
    """
    from ..core.prototype_map import prototype_label_image
    from ..core.prototypes import load_prototypes
    from ..core.store import PatchStore

    st = PatchStore(store)
    protos = load_prototypes(st)
    li = prototype_label_image(st, slide_id)
    k = li.k
    labels = li.labels.astype(np.uint8 if k < 255 else np.uint16)
    counts = np.bincount(labels.ravel(), minlength=k + 1)[1:k + 1]
    n = int(counts.sum())
    scale, translate = aligned(li.footprint_px, frame.scale, frame.translate)
    features = {
        "index": np.arange(1, k + 1),
        "prototype": np.arange(k),
        "count": counts.astype(np.int64),
        "share": counts / max(n, 1),
        "store_count": np.asarray(protos.sizes, np.int64),
    }
    kwargs = {
        "name": f"{frame.name} prototypes",
        "scale": scale,
        "translate": translate,
        "units": frame.units,
        "opacity": 0.55,
        "colormap": colormap(li.colors, hidden),
        "features": features,
        "metadata": {OVERLAY_KEY: PROTOTYPES, "slide_path": frame.path, "store": str(st.path), "slide_id": slide_id,
                     "fit_id": protos.attrs.get("fit_id"), "k": k, "footprint": li.footprint_px,
                     "encoder_key": protos.encoder_key, "colors": li.colors.tolist(), "n_patches": n},
    }
    return labels, kwargs, "labels"


def mosaic(patches: np.ndarray, color: Sequence[int], columns: int | None = None,
           gap: int | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Patches ``(N, S, S, 3)`` as one RGB image on a ``color`` background; also each tile's (row, col) origin."""
    n, s = int(patches.shape[0]), int(patches.shape[1])
    cols = columns or max(1, int(np.ceil(np.sqrt(max(n, 1)))))
    rows = max(1, -(-n // cols))
    g = gap if gap is not None else max(2, s // 16)
    out = np.empty((rows * (s + g) + g, cols * (s + g) + g, 3), np.uint8)
    out[:] = np.asarray(color, np.uint8)
    origins = []
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = g + r * (s + g), g + c * (s + g)
        out[y:y + s, x:x + s] = patches[i]
        origins.append((y, x))
    return out, origins


def gallery_layer_data(store: str | Path, prototype: int, frame: SlideFrame, slide: StoreSlide,
                       colors: np.ndarray, protos=None) -> tuple[np.ndarray, dict[str, Any], str]:
    """RGB image layer data: prototype ``prototype``'s exemplar patches (nearest the centroid first), as a mosaic.

    The gallery stands to the right of the slide, top-aligned with it, at the patches'
    physical pixel size times a whole magnification that makes it about half the slide's
    height (the magnification is in its name).
    """
    from ..core.prototypes import load_prototypes
    from ..core.store import PatchStore

    st = PatchStore(store)
    p = protos if protos is not None else load_prototypes(st)
    picks = [(p.slides[int(si)], int(pi)) for si, pi in zip(p.exemplar_slide[prototype], p.exemplar_patch[prototype])
             if si >= 0]
    s = st.patch_size
    pats = (np.stack([np.asarray(st.slide(sid).group["patches"][pi]) for sid, pi in picks]) if picks
            else np.zeros((0, s, s, 3), np.uint8))
    img, origins = mosaic(pats, colors[prototype])
    sy, sx = (float(v) for v in frame.scale)
    ty, tx = (float(v) for v in frame.translate)
    w0, h0 = slide.dimensions
    px = slide.footprint / slide.patch_size  # level-0 pixels per patch pixel
    mag = max(1, int(0.5 * h0 // (img.shape[0] * px)))
    gy, gx = sy * px * mag, sx * px * mag
    top = ty - sy / 2  # the slide's top edge
    left = tx + (w0 - 0.5) * sx + 0.04 * w0 * sx  # right of the slide's right edge, with a margin
    kwargs = {
        "name": f"prototype {prototype} exemplars" + (f" (×{mag})" if mag > 1 else ""),
        "rgb": True,
        "contrast_limits": (0, 255),
        "scale": (gy, gx),
        "translate": (top + gy / 2, left + gx / 2),
        "units": frame.units,
        "metadata": {OVERLAY_KEY: GALLERY, "slide_path": frame.path, "store": str(st.path), "prototype": prototype,
                     "exemplars": [[sid, pi] for sid, pi in picks], "origins": [list(o) for o in origins],
                     "patch_size": s, "magnification": mag},
    }
    return img, kwargs, "image"
