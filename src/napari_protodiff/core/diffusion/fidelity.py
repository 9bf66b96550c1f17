"""Quality of synthetic patches, measured: prototype hit rate, fidelity, memorisation.

* **Hit rate**: share of synthetic patches that the *same* encoder and centroids the
  prototypes came from assign to the prototype that was requested for them.
* **Fréchet distance** between Gaussians fitted to real and synthetic features (FID's
  formula, in the prototypes' encoder space: no Inception weights are downloaded).
* **PRDC** (Naeem et al. 2020, "Reliable fidelity and diversity metrics"): precision,
  recall, density and coverage from k-nearest-neighbour balls (``k = 5``).
* **Memorisation audit**: for each synthetic patch its distance to the nearest real
  (training) patch, against the real patches' own leave-one-out nearest-neighbour
  distances; a synthetic patch closer to a real one than ``near_copy_quantile`` of the
  real-to-real distances is flagged as a near-copy. Done in pixel space (patches at
  32 px, [0, 1]) and in feature space.

All of it overall and per prototype, for each sampling run in the synthetic store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..store import PatchStore
from .errors import PrototypeError


# -- metrics on feature arrays -----------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _cdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch

    ta, tb = torch.from_numpy(np.ascontiguousarray(a, np.float32)), torch.from_numpy(np.ascontiguousarray(b, np.float32))
    return torch.cdist(ta, tb).numpy()


def _kth_nn(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of x to its k-th nearest other row."""
    d = _cdist(x, x)
    np.fill_diagonal(d, np.inf)
    k = min(k, len(x) - 1)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k-NN radii."""
    if len(real) <= k or len(fake) <= k:
        return {"precision": float("nan"), "recall": float("nan"), "density": float("nan"),
                "coverage": float("nan")}
    r_real, r_fake = _kth_nn(real, k), _kth_nn(fake, k)
    d = _cdist(real, fake)  # (Nr, Nf)
    inside = d < r_real[:, None]
    return {"precision": float(inside.any(0).mean()),
            "recall": float((d < r_fake[None, :]).any(1).mean()),
            "density": float(inside.sum(0).mean() / k),
            "coverage": float((d.min(1) < r_real).mean())}


def memorisation(real: np.ndarray, fake: np.ndarray, quantile: float = 0.01) -> dict[str, Any]:
    """Nearest-real distances of synthetic rows against real leave-one-out NN distances."""
    d_real = _kth_nn(real, 1)
    d_fake = _cdist(fake, real).min(1)
    thr = float(np.quantile(d_real, quantile))
    flagged = d_fake < thr
    return {"threshold": thr, "quantile": quantile, "near_copies": int(flagged.sum()),
            "near_copy_share": float(flagged.mean()) if len(fake) else 0.0,
            "synthetic_to_real_median": float(np.median(d_fake)) if len(fake) else float("nan"),
            "real_to_real_median": float(np.median(d_real)),
            "ratio_median": float(np.median(d_fake) / max(np.median(d_real), 1e-12)) if len(fake) else float("nan"),
            "_d_fake": d_fake, "_d_real": d_real, "_flagged": flagged}


def hit_rate(requested: np.ndarray, assigned: np.ndarray) -> dict[str, Any]:
    sel = requested >= 0
    per = {}
    for p in np.unique(requested[sel]):
        m = requested == p
        per[int(p)] = float((assigned[m] == p).mean())
    return {"hit_rate": float((assigned[sel] == requested[sel]).mean()) if sel.any() else float("nan"),
            "n": int(sel.sum()), "per_prototype": per}


# -- stores ---------------------------------------------------------------------------------------------
def _pixels32(pix: np.ndarray) -> np.ndarray:
    from .data import resize_uint8

    return resize_uint8(pix, 32).reshape(len(pix), -1).astype(np.float32) / 255.0


def _subsample(n: int, m: int, seed: int) -> np.ndarray:
    return np.arange(n) if n <= m else np.sort(np.random.default_rng(seed).choice(n, m, replace=False))


def synthetic_runs(st: PatchStore) -> list:
    return [e for e in st.slides() if e.attrs.get("kind") == "synthetic"]


def evaluate_fidelity(real_store: str | Path, synth_store: str | Path, k: int = 5, max_real: int = 4000,
                      max_synth: int = 4000, near_copy_quantile: float = 0.01, seed: int = 0,
                      keep_arrays: bool = False) -> dict[str, Any]:
    """All the numbers above for every complete sampling run in ``synth_store``."""
    from .prototypes_adapter import assign_images, read_prototypes, store_patches

    real = PatchStore(real_store)
    synth = PatchStore(synth_store)
    pset = read_prototypes(real)
    runs = synthetic_runs(synth)
    if not runs:
        raise PrototypeError(f"{synth.path}: no complete sampling run in this store (is it a synthetic store?).")
    rsel = _subsample(len(pset.labels), max_real, seed)
    rpix = store_patches(real)[rsel]
    rlab = pset.labels[rsel]
    _, rfeat = assign_images(rpix, pset)
    rpx = _pixels32(rpix)
    report: dict[str, Any] = {"real_store": str(real.path), "synthetic_store": str(synth.path), "k": k,
                              "encoder": pset.encoder, "n_real": int(len(rsel)), "runs": []}
    for e in runs:
        a = e.attrs
        ssel = _subsample(e.n_patches, max_synth, seed)
        spix = np.asarray(e.group["patches"][:])[ssel]
        req = np.asarray(e.group["prototype"][:])[ssel]
        assigned, sfeat = assign_images(spix, pset)
        spx = _pixels32(spix)
        run: dict[str, Any] = {"run_id": e.slide_id, "n": int(len(ssel)), "model_hash": a.get("model_hash"),
                               "guidance": (a.get("sample_config") or {}).get("guidance"),
                               "cfg_scale": (a.get("sample_config") or {}).get("cfg_scale"),
                               "prototypes": (a.get("sample_config") or {}).get("prototypes"),
                               "hit": hit_rate(req, assigned),
                               "assigned_counts": np.bincount(assigned, minlength=pset.k).tolist(),
                               "frechet_distance": frechet_distance(rfeat, sfeat), **prdc(rfeat, sfeat, k)}
        mem_px = memorisation(rpx, spx, near_copy_quantile)
        mem_ft = memorisation(rfeat, sfeat, near_copy_quantile)
        arrays = {"d_fake_px": mem_px.pop("_d_fake"), "d_real_px": mem_px.pop("_d_real"),
                  "flagged_px": mem_px.pop("_flagged")}
        for key in ("_d_fake", "_d_real", "_flagged"):
            mem_ft.pop(key)
        run["memorisation"] = {"pixels": mem_px, "features": mem_ft}
        per = {}
        for p in range(pset.k):
            rm, sm = rlab == p, req == p
            if sm.sum() < 2:
                continue
            per[p] = {"n_real": int(rm.sum()), "n_synthetic": int(sm.sum()),
                      "frechet_distance": frechet_distance(rfeat[rm], sfeat[sm]), **prdc(rfeat[rm], sfeat[sm], k)}
        run["per_prototype"] = per
        if keep_arrays:
            run["_arrays"] = arrays
        report["runs"].append(run)
    return report


def save_plots(report: dict[str, Any], folder: str | Path) -> list[str]:
    """A PNG per run: nearest-real distance histograms and per-prototype hit rate / PRDC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for run in report["runs"]:
        arr = run.get("_arrays")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        if arr is not None:
            bins = np.linspace(0, max(arr["d_fake_px"].max(), arr["d_real_px"].max()) * 1.02 + 1e-9, 40)
            axes[0].hist(arr["d_real_px"], bins=bins, alpha=0.6, density=True, label="real -> nearest other real")
            axes[0].hist(arr["d_fake_px"], bins=bins, alpha=0.6, density=True, label="synthetic -> nearest real")
            axes[0].axvline(run["memorisation"]["pixels"]["threshold"], color="k", ls="--", label="near-copy threshold")
            axes[0].set_xlabel("L2 distance (32-px pixels)")
            axes[0].legend(fontsize=7)
        axes[0].set_title("memorisation audit")
        per = run["per_prototype"]
        ids = sorted(per, key=int)
        xs = np.arange(len(ids))
        hits = [run["hit"]["per_prototype"].get(int(i), run["hit"]["per_prototype"].get(str(i), np.nan)) for i in ids]
        for j, (name, vals) in enumerate((("hit rate", hits),
                                          ("precision", [per[i]["precision"] for i in ids]),
                                          ("recall", [per[i]["recall"] for i in ids]),
                                          ("coverage", [per[i]["coverage"] for i in ids]))):
            axes[1].bar(xs + j * 0.2 - 0.3, vals, width=0.2, label=name)
        axes[1].set_xticks(xs, [str(i) for i in ids])
        axes[1].set_xlabel("prototype")
        axes[1].set_ylim(0, 1.05)
        axes[1].legend(fontsize=7)
        axes[1].set_title(f"{run['run_id']}: guidance {run['guidance']}")
        fig.tight_layout()
        p = out / f"fidelity_{run['run_id']}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(str(p))
    return paths


def strip_arrays(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its numpy arrays (JSON-ready)."""
    out = dict(report)
    out["runs"] = [{k: v for k, v in r.items() if k != "_arrays"} for r in report["runs"]]
    return out


# -- nearest real patch of each synthetic one (the Synthesize widget's "show nearest real patch") ---------
def nearest_real_patches(real_store: str | Path, images: np.ndarray, chunk: int = 4096, audit_sample: int = 2000,
                         near_copy_quantile: float = 0.01, seed: int = 0, cancel=None):
    """Each synthetic image's nearest real patch of ``real_store`` (in the memorisation audit's space:
    patches at 32 px, [0, 1], L2), searched over *all* complete slides a chunk at a time.

    A generator of :class:`~napari_protodiff.core.progress.Progress` events (one per chunk) that
    checks ``cancel``; returns a dict: ``index`` (store order), ``slide_id``, ``patch`` (index in
    the slide), ``coords`` (level-0 x, y), ``distance``, ``patches`` (the real patches, uint8,
    resized to the images' size), ``threshold`` (the near-copy distance: ``near_copy_quantile``
    of real-to-real nearest-neighbour distances over ``audit_sample`` real patches) and
    ``near_copy`` (distance below it).
    """
    from ..errors import StoreError
    from ..progress import Progress
    from .data import resize_uint8

    images = np.asarray(images, np.uint8)
    path = Path(real_store)
    if not PatchStore.is_store(path):
        raise StoreError(f"{path}: the real patch store is not available (moved or deleted?).")
    st = PatchStore(path)
    slides = st.slides()
    total = sum(e.n_patches for e in slides)
    if not total:
        raise StoreError(f"{path}: the store has no completely tiled slide to compare with.")
    fake = _pixels32(images)
    best = np.full(len(images), np.inf)
    where = np.zeros((len(images), 2), np.int64)  # (slide number, patch index)
    rng = np.random.default_rng(seed)
    audit_idx = np.sort(rng.choice(total, min(audit_sample, total), replace=False))
    audit: list[np.ndarray] = []
    done = 0
    for si, e in enumerate(slides):
        arr = e.group["patches"]
        for s in range(0, e.n_patches, chunk):
            if cancel is not None:
                cancel.raise_if_cancelled()
            real = _pixels32(np.asarray(arr[s:s + chunk]))
            d = _cdist(fake, real)
            j = d.argmin(1)
            dj = d[np.arange(len(fake)), j]
            better = dj < best
            best[better] = dj[better]
            where[better] = np.stack([np.full(better.sum(), si), s + j[better]], 1)
            sel = audit_idx[(audit_idx >= done + s) & (audit_idx < done + s + len(real))] - done - s
            audit.append(real[sel])
            yield Progress(done + s + len(real), total, f"nearest real patch: {done + s + len(real):,}/{total:,}")
        done += e.n_patches
    ref = np.concatenate(audit)
    threshold = float(np.quantile(_kth_nn(ref, 1), near_copy_quantile)) if len(ref) > 1 else 0.0
    offsets = np.cumsum([0] + [e.n_patches for e in slides])
    real = np.stack([np.asarray(slides[si].group["patches"][int(p)]) for si, p in where]) if len(images) else \
        np.zeros((0, st.patch_size, st.patch_size, 3), np.uint8)
    return {"index": (offsets[where[:, 0]] + where[:, 1]).astype(np.int64),
            "slide_id": [slides[si].slide_id for si in where[:, 0]],
            "patch": where[:, 1].astype(np.int64),
            "coords": np.stack([np.asarray(slides[si].group["coords"][int(p)]) for si, p in where]).astype(np.int64)
            if len(images) else np.zeros((0, 2), np.int64),
            "distance": best.astype(np.float32),
            "patches": resize_uint8(real, images.shape[1]) if len(images) else real,
            "threshold": threshold, "near_copy": best < threshold, "store": str(st.path)}
