"""Test cohorts with a planted signal, built from real patches.

No clinical cohort can be shipped, so the MIL engine is checked on cohorts whose truth
is known: real patches are clustered into prototypes, one prototype is *planted*, and
each slide is a bag of real patches in which the planted prototype has a chosen share.

- classification: positive slides carry a share of planted patches (``share`` range),
  negative ones none; the label is decided by that share alone;
- survival: each patient's planted share ``s`` sets an exponential hazard
  ``base * exp(beta * s / max(share))``, times are drawn from it and censored at
  uniform random times;
- ``signal=False`` removes the signal: outcomes are drawn exactly as above, but every
  bag is filled from the other prototypes only (no planted patch anywhere), so
  nothing in the bags tells the outcome (the check that metrics then fall to chance).

Each patient has ``slides_per_patient`` slides of the same outcome, so patient-grouped
folds are exercised.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .mil import Bag


def prototypes(x: np.ndarray, k: int = 6, seed: int = 0) -> np.ndarray:
    """Prototype (k-means cluster) index of each patch feature (standardised first)."""
    from sklearn.cluster import KMeans

    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(z)


def pick_planted(proto: np.ndarray, min_count: int = 40) -> int:
    """The prototype to plant: the smallest one with at least ``min_count`` patches."""
    counts = np.bincount(proto)
    ok = np.flatnonzero(counts >= min_count)
    return int(ok[np.argmin(counts[ok])]) if len(ok) else int(np.argmax(counts))


def planted_bags(features: np.ndarray, proto: np.ndarray, planted: int,
                 task: Literal["classification", "survival"] = "classification", n_patients: int = 60,
                 slides_per_patient: int = 2, bag_size: int = 32, share: tuple[float, float] = (0.15, 0.4),
                 signal: bool = True, beta: float = 6.0, censoring: float = 0.3, seed: int = 0,
                 coords: np.ndarray | None = None) -> list[Bag]:
    """Bags of real patches with a planted share of prototype ``planted`` (see the module docstring).

    ``bag.meta["planted"]`` marks the planted patches, ``bag.meta["source"]`` the indices
    of the patches in ``features``, ``bag.meta["share"]`` the planted share.
    """
    rng = np.random.default_rng(seed)
    pool_in = np.flatnonzero(proto == planted)
    pool_out = np.flatnonzero(proto != planted)
    if task == "classification":
        pos = rng.permutation(np.arange(n_patients) % 2 == 1)
        shares = np.where(pos, rng.uniform(*share, n_patients), 0.0)
        outcome = [{"label": "planted" if lab else "background"} for lab in pos]
    else:
        shares = rng.uniform(0.0, share[1], n_patients)
        hazard = 0.1 * np.exp(beta * shares / share[1])
        t_event = rng.exponential(1.0 / hazard)
        t_cens = rng.uniform(0, np.median(t_event) / censoring, n_patients)
        event = (t_event <= t_cens).astype(int)
        time = np.minimum(t_event, t_cens)
        outcome = [{"time": float(time[i]), "event": int(event[i])} for i in range(n_patients)]
    bags = []
    for p in range(n_patients):
        for s in range(slides_per_patient):
            k_in = int(round(shares[p] * bag_size)) if signal else 0
            src = np.concatenate([rng.choice(pool_in, k_in, replace=k_in > len(pool_in)),
                                  rng.choice(pool_out, bag_size - k_in, replace=bag_size - k_in > len(pool_out))])
            src = rng.permutation(src)
            c = coords[src] if coords is not None else _mosaic(bag_size)
            bags.append(Bag(slide_id=f"P{p:03d}-S{s}", patient=f"P{p:03d}", features=features[src].astype(np.float32),
                            coords=c, meta={"planted": proto[src] == planted, "source": src, "share": float(shares[p])},
                            **outcome[p]))
    return bags


def _mosaic(n: int, step: int = 1) -> np.ndarray:
    cols = int(np.ceil(np.sqrt(n)))
    i = np.arange(n)
    return np.stack([(i % cols) * step, (i // cols) * step], axis=1).astype(np.int64)


def attention_concentration(bags: list[Bag], attention: list[np.ndarray]) -> tuple[float, float]:
    """(mean attention mass on planted patches, mean planted share) over bags that have planted patches."""
    mass, shares = [], []
    for b, a in zip(bags, attention):
        m = b.meta["planted"]
        if m.any():
            mass.append(float(a[m].sum() / max(a.sum(), 1e-12)))
            shares.append(float(m.mean()))
    return (float(np.mean(mass)), float(np.mean(shares))) if mass else (float("nan"), float("nan"))


def write_planted_cohort(source_store, out_dir, encoder_key: str = "builtin",
                         task: Literal["classification", "survival"] = "classification", n_patients: int = 12,
                         slides_per_patient: int = 2, bag_size: int = 16, k: int = 6, seed: int = 0,
                         signal: bool = True):
    """A planted cohort on disk: ``out_dir/cohort.zarr`` (one virtual slide per bag, its real patches laid out
    as a mosaic) and ``out_dir/cohort.csv``, ready for ``protodiff evaluate mil``.

    The prototypes are computed from the source store's embeddings from ``encoder_key``.
    Returns (cohort CSV path, store path, bags).
    """
    from pathlib import Path

    from ..embedding import read_embeddings
    from ..store import PatchStore

    src = PatchStore(source_store)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = np.concatenate([read_embeddings(src, s, encoder_key) for s in src.slide_ids])
    pix = np.concatenate([np.asarray(src.slide(s).patches().compute()) for s in src.slide_ids])
    proto = prototypes(x, k, seed)
    bags = planted_bags(x, proto, pick_planted(proto), task=task, n_patients=n_patients,
                        slides_per_patient=slides_per_patient, bag_size=bag_size, signal=signal, seed=seed)
    size = src.patch_size
    st = PatchStore.create(out / "cohort.zarr", size, src.mpp)
    rows = []
    for b in bags:
        coords = _mosaic(len(b.features), step=size)
        b.coords = coords
        e = st.add_slide(b.slide_id, {"footprint_level0": size, "slide_mpp": src.mpp, "patch_mpp": src.mpp,
                                      "patch_size": size, "planted": b.meta["planted"].tolist()},
                         coords, np.ones(len(coords), np.float32), np.array([0, len(coords)]))
        e.group["patches"][:] = pix[b.meta["source"]]
        e.group["block_done"][:] = 1
        st.mark_complete(b.slide_id)
        rows.append(f"{b.slide_id},{b.patient}," + (str(b.label) if task == "classification" else f"{b.time:.6g},{b.event}"))
    head = "slide,patient,label" if task == "classification" else "slide,patient,time,event"
    (out / "cohort.csv").write_text(head + "\n" + "\n".join(rows) + "\n")
    return out / "cohort.csv", out / "cohort.zarr", bags
