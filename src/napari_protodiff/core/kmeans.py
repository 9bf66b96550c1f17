"""Fast, deterministic k-means in torch (CPU or GPU): k-means++, Lloyd, mini-batch.

* **Distances** are computed as ``|x|² - 2 x·c + |c|²`` with one matrix product per
  chunk of rows (float32, ``chunk_rows`` rows at a time, so memory stays bounded);
  sums of squared distances are accumulated in float64.
* **Initialisation**: greedy k-means++ (``2 + ln k`` candidate centres per step, the
  best kept, as in scikit-learn) on a random subsample of at most ``init_size`` rows.
* **Lloyd** (``algorithm="lloyd"``): full passes until the centres move less than
  ``tol`` x (mean per-dimension variance), or ``max_iter``.
* **Mini-batch** (``algorithm="minibatch"``, for millions of rows): Lloyd on the
  k-means++ sample, then mini-batch updates (Sculley 2010: each centre moves towards
  the mean of its batch members with step ``n_batch / n_seen``) on random batches
  drawn without replacement, then ``refine_iter`` full Lloyd passes and a final full
  assignment, so labels are always the nearest centre of the returned centroids.
* ``algorithm="auto"``: Lloyd up to ``AUTO_LLOYD_MAX_ROWS`` rows, mini-batch above.
* **Restarts**: ``restarts`` runs with seeds derived from ``seed``; the lowest inertia wins.
* **Empty clusters** are re-seeded with the points farthest from their centres.
* **Determinism**: every random choice comes from a generator seeded with ``seed``;
  the same data, parameters, seed and machine (thread count) give identical results.

**Soft membership** (:func:`soft_membership`) of a point in prototype *j* is
``softmax_j(-d²(x, c_j) / T)``: T is a temperature in squared-distance units. A
natural choice (used by :mod:`.prototypes`) is the mean squared distance of points to
their own centre (``inertia / N``): smaller T makes memberships harder (one-hot as
T -> 0), larger T spreads them (uniform as T -> inf).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import ProtodiffError
from .progress import CancelToken

AUTO_LLOYD_MAX_ROWS = 100_000
ALGORITHMS = ("auto", "lloyd", "minibatch")


@dataclass
class KMeansResult:
    centroids: np.ndarray
    """(k, D) float32."""
    labels: np.ndarray
    """(N,) int32 index of each row's nearest centroid."""
    sqdist: np.ndarray
    """(N,) float32 squared distance of each row to its centroid."""
    inertia: float
    n_iter: int
    algorithm: str
    seed: int
    restart_inertias: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"k": int(self.centroids.shape[0]), "inertia": self.inertia, "n_iter": self.n_iter,
                "algorithm": self.algorithm, "seed": self.seed, "restart_inertias": self.restart_inertias,
                "seconds": round(self.seconds, 3)}


def _torch():
    import torch

    return torch


def _sqn(x):
    """Row-wise squared norms (``vector_norm`` is several times faster than ``(x * x).sum(1)``)."""
    return _torch().linalg.vector_norm(x, dim=1).square_()


def check_finite(x: np.ndarray, what: str = "the embeddings") -> None:
    """Raise a one-sentence error if ``x`` holds NaN or infinite values."""
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))
        raise ProtodiffError(f"{what.capitalize()} contain NaN or infinite values in {rows.size} row(s) "
                             f"(first: row {int(rows[0])}); re-embed them or drop those patches.")


class _Data:
    """Rows of a (N, D) float32 array on a torch device, read in chunks."""

    def __init__(self, x: np.ndarray, device: str, chunk_rows: int) -> None:
        torch = _torch()
        self.np = np.ascontiguousarray(x, dtype=np.float32)
        self.n, self.d = self.np.shape
        self.device = torch.device(device)
        self.chunk = max(1, int(chunk_rows))
        on_gpu = self.device.type != "cpu"
        fits = on_gpu and self.np.nbytes < 0.5 * _free_device_bytes(self.device)
        self.t = torch.from_numpy(self.np).to(self.device) if (not on_gpu or fits) else None
        self._sqn = None

    def rows(self, s: int, e: int):
        if self.t is not None:
            return self.t[s:e]
        return _torch().from_numpy(self.np[s:e]).to(self.device, non_blocking=True)

    def take(self, idx: np.ndarray):
        torch = _torch()
        if self.t is not None:
            return self.t[torch.from_numpy(idx).to(self.device)]
        return torch.from_numpy(self.np[idx]).to(self.device)

    def chunks(self):
        for s in range(0, self.n, self.chunk):
            yield s, min(self.n, s + self.chunk)

    def sqnorms(self):
        if self._sqn is None:
            torch = _torch()
            out = torch.empty(self.n, dtype=torch.float32, device=self.device)
            for s, e in self.chunks():
                xc = self.rows(s, e)
                out[s:e] = _sqn(xc)
            self._sqn = out
        return self._sqn


def _free_device_bytes(device) -> float:
    torch = _torch()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    return 8e9


def _nearest(xc, c, c2, x2c):
    """Nearest centre of each row of ``xc``: (labels int64, squared distances float32)."""
    torch = _torch()
    d = torch.addmm(c2.unsqueeze(0), xc, c.T, beta=1.0, alpha=-2.0)
    val, lab = d.min(1)
    return lab, (val + x2c).clamp_(min=0)


def assign(x: np.ndarray, centroids: np.ndarray, device: str = "cpu", chunk_rows: int = 65536):
    """Nearest centroid of every row: (labels (N,) int32, squared distances (N,) float32)."""
    torch = _torch()
    data = _Data(x, device, chunk_rows)
    c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(data.device)
    c2 = (c * c).sum(1)
    labels = np.empty(data.n, np.int32)
    sqd = np.empty(data.n, np.float32)
    with torch.inference_mode():
        for s, e in data.chunks():
            xc = data.rows(s, e)
            lab, dist = _nearest(xc, c, c2, _sqn(xc))
            labels[s:e] = lab.cpu().numpy()
            sqd[s:e] = dist.cpu().numpy()
    return labels, sqd


def sqdist_matrix(x: np.ndarray, centroids: np.ndarray, device: str = "cpu", chunk_rows: int = 65536) -> np.ndarray:
    """(N, k) float32 squared distances of every row to every centroid."""
    torch = _torch()
    data = _Data(x, device, chunk_rows)
    c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(data.device)
    c2 = (c * c).sum(1)
    out = np.empty((data.n, c.shape[0]), np.float32)
    with torch.inference_mode():
        for s, e in data.chunks():
            xc = data.rows(s, e)
            d = torch.addmm(c2.unsqueeze(0), xc, c.T, beta=1.0, alpha=-2.0).add_(_sqn(xc).unsqueeze(1))
            out[s:e] = d.clamp_(min=0).cpu().numpy()
    return out


def soft_membership(sqdist: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise ``softmax(-sqdist / temperature)`` of a (N, k) squared-distance matrix (float32)."""
    if not temperature > 0:
        raise ProtodiffError(f"The membership temperature must be positive, not {temperature}.")
    z = -np.asarray(sqdist, np.float64) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


def kmeans_plusplus(data: _Data, k: int, idx: np.ndarray, gen: np.random.Generator):
    """Greedy k-means++ over the rows ``idx`` of ``data``; returns (k, D) centres (torch)."""
    torch = _torch()
    xs = data.take(idx)
    x2 = _sqn(xs)
    n = xs.shape[0]
    trials = 2 + int(math.log(k))
    first = int(gen.integers(n))
    centres = [xs[first]]
    closest = (x2 - 2 * xs @ xs[first] + x2[first]).clamp_(min=0)
    for _ in range(1, k):
        pot = float(closest.sum())
        if pot <= 0:  # fewer distinct points than k: pick the rest uniformly
            cand = gen.integers(n, size=1)
        else:
            p = closest.double().cpu().numpy() / pot
            cand = gen.choice(n, size=trials, p=p / p.sum())
        cand_t = torch.from_numpy(np.asarray(cand)).to(xs.device)
        cx = xs[cand_t]
        d = (x2.unsqueeze(1) - 2 * xs @ cx.T + (cx * cx).sum(1).unsqueeze(0)).clamp_(min=0)
        new_closest = torch.minimum(closest.unsqueeze(1), d)
        best = int(new_closest.sum(0).argmin())
        closest = new_closest[:, best].contiguous()
        centres.append(cx[best])
    return torch.stack(centres).clone()


def _lloyd_pass(data: _Data, c, idx=None):
    """One assignment pass over all rows (or rows ``idx``): sums, counts, inertia, worst rows."""
    torch = _torch()
    k, d = c.shape
    c2 = (c * c).sum(1)
    sums = torch.zeros((k, d), dtype=torch.float32, device=c.device)
    counts = torch.zeros(k, dtype=torch.float64, device=c.device)
    inertia = 0.0
    far_val, far_idx = [], []
    if idx is None:
        x2 = data.sqnorms()
        spans = ((s, e, data.rows(s, e), x2[s:e]) for s, e in data.chunks())
    else:
        xs = data.take(idx)
        spans = [(0, len(idx), xs, _sqn(xs))]
    for s, e, xc, x2c in spans:
        lab, dist = _nearest(xc, c, c2, x2c)
        sums.index_add_(0, lab, xc)
        counts += torch.bincount(lab, minlength=k).double()
        inertia += float(dist.double().sum())
        m = min(k, dist.shape[0])
        v, i = dist.topk(m)
        far_val.append(v)
        far_idx.append(i + s)
    far = torch.cat(far_idx)[torch.cat(far_val).argsort(descending=True)[:k]]
    return sums, counts, inertia, far


def _update(c, sums, counts, far, data: _Data, idx=None):
    """New centres = means; empty clusters take the farthest points (deterministic)."""
    torch = _torch()
    new = sums / counts.clamp(min=1).float().unsqueeze(1)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        rows = far[: empty.numel()].cpu().numpy()
        src = idx[rows] if idx is not None else rows
        new[empty] = data.take(np.asarray(src))
    return new


def _lloyd(data, c, max_iter, tol_abs, idx=None, cancel=None, callback=None, stage="lloyd"):
    torch = _torch()
    it = 0
    for it in range(1, max_iter + 1):
        if cancel is not None:
            cancel.raise_if_cancelled()
        sums, counts, inertia, far = _lloyd_pass(data, c, idx)
        new = _update(c, sums, counts, far, data, idx)
        shift = float(((new - c) ** 2).sum())
        c = new
        if callback is not None:
            callback(stage, it, max_iter, inertia)
        if shift <= tol_abs:
            break
    return c, it


def _minibatch(data, c, gen, batch_size, n_steps, cancel=None, callback=None):
    torch = _torch()
    k = c.shape[0]
    seen = torch.zeros(k, dtype=torch.float32, device=c.device)
    perm = gen.permutation(data.n)
    pos = 0
    for step in range(1, n_steps + 1):
        if cancel is not None and step % 8 == 0:
            cancel.raise_if_cancelled()
        if pos + batch_size > data.n:
            perm, pos = gen.permutation(data.n), 0
        idx = np.sort(perm[pos:pos + batch_size])
        pos += batch_size
        xb = data.take(idx)
        c2 = (c * c).sum(1)
        lab, _ = _nearest(xb, c, c2, _sqn(xb))
        cnt = torch.bincount(lab, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, lab, xb)
        seen += cnt
        hit = cnt > 0
        # c_j <- c_j + (sum_j - n_j c_j) / seen_j  (per-centre learning rate n_j / seen_j)
        c[hit] += (sums[hit] - cnt[hit].unsqueeze(1) * c[hit]) / seen[hit].unsqueeze(1)
        if callback is not None and step % 16 == 0:
            callback("minibatch", step, n_steps, float("nan"))
    return c


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    restarts: int = 1,
    algorithm: str = "auto",
    max_iter: int = 100,
    tol: float = 1e-4,
    init_size: int | None = None,
    sample_size: int | None = None,
    batch_size: int = 4096,
    n_steps: int | None = None,
    refine_iter: int = 0,
    device: str = "cpu",
    chunk_rows: int = 65536,
    cancel: CancelToken | None = None,
    callback: Callable[[str, int, int, float], None] | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` (N, D) into ``k`` centres (see the module docstring).

    ``callback(stage, step, total, inertia)`` is called as the fit goes on.
    """
    torch = _torch()
    t0 = time.perf_counter()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ProtodiffError(f"k-means needs a (rows, dimensions) array, not one of shape {x.shape}.")
    n = x.shape[0]
    if algorithm not in ALGORITHMS:
        raise ProtodiffError(f"Unknown k-means algorithm '{algorithm}'; choose one of {', '.join(ALGORITHMS)}.")
    if k < 1:
        raise ProtodiffError(f"k must be at least 1, not {k}.")
    if n == 0:
        raise ProtodiffError("There are no embeddings to cluster.")
    if k > n:
        raise ProtodiffError(f"k = {k} is larger than the number of patches ({n}); choose k <= {n}.")
    if restarts < 1:
        raise ProtodiffError(f"restarts must be at least 1, not {restarts}.")
    check_finite(x)
    algo = algorithm if algorithm != "auto" else ("lloyd" if n <= AUTO_LLOYD_MAX_ROWS else "minibatch")
    with _small_problem_threads(n * x.shape[1] * k, device):
        best = _fit(x, k, n, algo, seed, restarts, max_iter, tol, init_size, sample_size, batch_size, n_steps,
                    refine_iter, device, chunk_rows, cancel, callback)
    best.seconds = time.perf_counter() - t0
    return best


class _small_problem_threads:
    """One torch thread for small CPU problems: thread start-up and hand-offs would cost more
    than the arithmetic (and much more on a busy machine). ``torch.set_num_threads`` is
    process-wide; the previous value is restored on exit."""

    def __init__(self, work: int, device: str) -> None:
        self.on = str(device).startswith("cpu") and work < 1_000_000_000
        self.prev = None

    def __enter__(self):
        if self.on:
            torch = _torch()
            self.prev = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            _torch().set_num_threads(self.prev)


def _fit(x, k, n, algo, seed, restarts, max_iter, tol, init_size, sample_size, batch_size, n_steps, refine_iter,
         device, chunk_rows, cancel, callback) -> KMeansResult:
    torch = _torch()
    data = _Data(x, device, chunk_rows)
    # Tolerance relative to the data's spread (as in scikit-learn), estimated on a sample.
    probe = data.np[np.random.default_rng(seed).choice(n, size=min(n, 20000), replace=False)]
    tol_abs = float(tol * probe.var(axis=0).mean()) * k
    best: KMeansResult | None = None
    inertias: list[float] = []
    seeds = np.random.SeedSequence(seed).spawn(restarts)
    with torch.inference_mode():
        for r, ss in enumerate(seeds):
            gen = np.random.default_rng(ss)
            isz = min(n, init_size or max(64 * k, 4096))
            n_iter = 0
            if algo == "lloyd":
                init_idx = np.sort(gen.choice(n, size=isz, replace=False)) if isz < n else np.arange(n)
                c = kmeans_plusplus(data, k, init_idx, gen)
                c, n_iter = _lloyd(data, c, max_iter, tol_abs, cancel=cancel, callback=callback)
            else:
                # Everything before the final pass works on one contiguous random sample.
                ssz = min(n, max(sample_size or 256 * k, isz))
                sample = _Data(data.np[np.sort(gen.choice(n, size=ssz, replace=False))], device, chunk_rows)
                with _small_problem_threads(ssz * data.d * k, device):
                    init_pos = np.sort(gen.choice(ssz, size=isz, replace=False)) if isz < ssz else np.arange(ssz)
                    c = kmeans_plusplus(sample, k, init_pos, gen)
                    c, n_iter = _lloyd(sample, c, min(max_iter, 20), tol_abs, cancel=cancel, callback=callback,
                                       stage="lloyd-sample")
                    steps = n_steps if n_steps is not None else _default_steps(n, batch_size, ssz)
                    if steps:
                        c = _minibatch(data, c, gen, batch_size, steps, cancel, callback)
                del sample
                if refine_iter:
                    c, it2 = _lloyd(data, c, refine_iter, tol_abs, cancel=cancel, callback=callback, stage="refine")
                    n_iter += it2
            labels, sqd = _final_assign(data, c, cancel)
            inertia = float(sqd.astype(np.float64).sum())
            inertias.append(inertia)
            if callback is not None:
                callback("restart", r + 1, restarts, inertia)
            if best is None or inertia < best.inertia:
                best = KMeansResult(c.cpu().numpy().astype(np.float32), labels, sqd, inertia, n_iter, algo, seed)
    assert best is not None
    best.restart_inertias = inertias
    return best


def _default_steps(n: int, batch_size: int, sample_size: int) -> int:
    """Mini-batch steps after the Lloyd sample: as many rows again as the sample held, at most n."""
    return int(min(n - sample_size, sample_size) // max(1, batch_size)) if n > sample_size else 0


def _final_assign(data: _Data, c, cancel):
    torch = _torch()
    c2 = (c * c).sum(1)
    labels = np.empty(data.n, np.int32)
    sqd = np.empty(data.n, np.float32)
    x2 = data.sqnorms()
    for s, e in data.chunks():
        if cancel is not None:
            cancel.raise_if_cancelled()
        lab, dist = _nearest(data.rows(s, e), c, c2, x2[s:e])
        labels[s:e] = lab.to(torch.int32).cpu().numpy()
        sqd[s:e] = dist.cpu().numpy()
    return labels, sqd


def silhouette(x: np.ndarray, labels: np.ndarray, sample_size: int = 4000, seed: int = 0) -> float:
    """Mean silhouette coefficient (Euclidean) on a random sample of at most ``sample_size`` rows."""
    x = np.asarray(x, np.float32)
    labels = np.asarray(labels)
    n = len(x)
    if n > sample_size:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))
        x, labels = x[idx], labels[idx]
    uniq, lab = np.unique(labels, return_inverse=True)
    if len(uniq) < 2 or len(uniq) >= len(x):
        return float("nan")
    sq = (x * x).sum(1).astype(np.float64)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x.astype(np.float64) @ x.astype(np.float64).T)
    dist = np.sqrt(np.clip(d2, 0, None))
    np.fill_diagonal(dist, 0.0)
    onehot = np.zeros((len(x), len(uniq)))
    onehot[np.arange(len(x)), lab] = 1.0
    counts = onehot.sum(0)
    sums = dist @ onehot  # (n, k) summed distances to each cluster
    own = counts[lab]
    a = sums[np.arange(len(x)), lab] / np.maximum(own - 1, 1)
    mean_other = sums / counts[None, :]
    mean_other[np.arange(len(x)), lab] = np.inf
    b = mean_other.min(1)
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-30), 0.0)
    return float(s.mean())


def kmeans_job(x: np.ndarray, k: int, cancel: CancelToken | None = None, **kwargs: Any):
    """:func:`kmeans` as a job: a generator of :class:`~.progress.Progress` events returning the result.

    The fit runs in a worker thread; closing the generator (or ``cancel``) stops it at
    the next check.
    """
    import queue
    import threading

    from .progress import Progress

    events: "queue.Queue[tuple[str, Any]]" = queue.Queue()
    stop = CancelToken()

    class _Either(CancelToken):
        def raise_if_cancelled(self) -> None:
            stop.raise_if_cancelled()
            if cancel is not None:
                cancel.raise_if_cancelled()

    def cb(stage, step, total, inertia):
        msg = f"k-means {stage} {step}/{total}" + ("" if math.isnan(inertia) else f", inertia {inertia:.5g}")
        events.put(("event", Progress(step, total, msg, {"stage": stage, "inertia": inertia})))

    def run():
        try:
            events.put(("done", kmeans(x, k, cancel=_Either(), callback=cb, **kwargs)))
        except BaseException as exc:  # forwarded to the consumer
            events.put(("error", exc))

    th = threading.Thread(target=run, name="protodiff-kmeans", daemon=True)
    th.start()
    try:
        while True:
            kind, val = events.get()
            if kind == "event":
                yield val
            elif kind == "done":
                return val
            else:
                raise val
    finally:
        stop.cancel()
        th.join()
