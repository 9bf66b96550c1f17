"""Prototype benchmark: k-means against scikit-learn and faiss; embedding throughput.

**Clustering.** 1,000,000 x 384 float32 embedding-like vectors (a mixture of 200
Gaussian components of random size and spread around random centres; cached under
``.benchmarks-data/``) into k = 64 clusters, each contender with one initialisation
and its own defaults otherwise, in its own process, all with the same number of
threads (``--threads``, default: the machine's cores):

* ``protodiff``: :func:`napari_protodiff.core.kmeans.kmeans` (``algorithm="auto"`` ->
  mini-batch: k-means++ on 4,096 rows, Lloyd on a 16,384-row sample, 4 mini-batches, a
  final exact assignment of every row);
* ``sklearn-minibatch``: ``MiniBatchKMeans(64, random_state=0)`` (labels of all rows computed);
* ``sklearn-kmeans``: ``KMeans(64, random_state=0)`` (Lloyd, k-means++, n_init=1, tol 1e-4);
* ``faiss``: ``faiss.Kmeans(384, 64, seed=0)`` (25 iterations on 256 x k sampled rows) +
  ``index.search`` of every row for the labels (faiss-cpu, if installed).

The time is fit + labels for every row, after the data is loaded. The *inertia* of
each result is computed afterwards by one common function: the sum over rows of the
squared distance to the nearest returned centroid (float64 sum).

**Embedding throughput** (patches/s): the built-in encoder and a ViT-S/16 (timm
``vit_small_patch16_224``, random weights from a local safetensors file, 224-px input)
through ``embed_store`` (read from the zarr store, encode, write embeddings to the
store) against a plain loop over the same patches held in memory (``encode`` of
batches of a numpy array; for the ViT, ``model(normalised tensor)`` in a
``torch.inference_mode`` loop). The store holds real H&E patches (224 px crops of
the images in tests/data).

Run ``.venv/bin/python benchmarks/prototypes.py`` (``--quick``: 100,000 rows, small
embedding sets; ``--help`` for more). ``--json-out FILE`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".benchmarks-data"
D, K, COMPONENTS = 384, 64, 200
CONTENDERS = ("protodiff", "faiss", "sklearn-minibatch", "sklearn-kmeans")


# -- data -----------------------------------------------------------------------------------
def embeddings(n: int) -> Path:
    path = DATA / f"embeddings_{n}x{D}.npy"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((COMPONENTS, D)).astype(np.float32)
    spread = rng.uniform(0.5, 1.2, COMPONENTS).astype(np.float32)
    comp = rng.choice(COMPONENTS, size=n, p=rng.dirichlet(np.ones(COMPONENTS)))
    x = np.lib.format.open_memmap(str(path) + ".tmp.npy", mode="w+", dtype=np.float32, shape=(n, D))
    for s in range(0, n, 100_000):
        c = comp[s:s + 100_000]
        x[s:s + len(c)] = centres[c] + rng.standard_normal((len(c), D), dtype=np.float32) * spread[c, None]
    x.flush()
    del x
    os.replace(str(path) + ".tmp.npy", path)
    return path


def inertia_of(x: np.ndarray, centroids: np.ndarray) -> float:
    from napari_protodiff.core.kmeans import assign

    _, d = assign(x, centroids)
    return float(d.astype(np.float64).sum())


# -- one clustering contender, in its own process ---------------------------------------------
def run_contender(name: str, data: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    x = np.load(data)
    if name == "protodiff":
        from napari_protodiff.core.kmeans import kmeans

        t = time.perf_counter()
        r = kmeans(x, K, seed=0)
        sec = time.perf_counter() - t
        cents, info = r.centroids, {"algorithm": r.algorithm, "n_iter": r.n_iter}
    elif name == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        km = faiss.Kmeans(D, K, seed=0)
        km.train(x)
        _, labels = km.index.search(x, 1)
        sec = time.perf_counter() - t
        cents, info = km.centroids, {"niter": km.cp.niter, "version": faiss.__version__}
    else:
        import sklearn
        from sklearn.cluster import KMeans, MiniBatchKMeans
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads):
            t = time.perf_counter()
            m = (MiniBatchKMeans(K, random_state=0) if name == "sklearn-minibatch" else KMeans(K, random_state=0)).fit(x)
            labels = m.labels_
            sec = time.perf_counter() - t
        cents, info = m.cluster_centers_.astype(np.float32), {"n_iter": int(m.n_iter_), "version": sklearn.__version__}
    return {"name": name, "seconds": sec, "inertia": inertia_of(x, cents), **info}


# -- embedding throughput ---------------------------------------------------------------------
def make_store(path: Path, n: int, size: int = 224) -> Path:
    """A store of ``n`` real H&E crops (``size`` px) from the images in tests/data."""
    from PIL import Image

    from napari_protodiff.core.store import PatchStore

    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((ROOT / "tests" / "data").glob("*.png")) +
            sorted((ROOT / "tests" / "data").glob("*.jp*g"))]
    rng = np.random.default_rng(0)
    pix = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        im = imgs[i % len(imgs)]
        y, x = rng.integers(0, im.shape[0] - size), rng.integers(0, im.shape[1] - size)
        pix[i] = im[y:y + size, x:x + size]
    if path.exists():
        shutil.rmtree(path)
    st = PatchStore.create(path, size, 0.5)
    coords = np.stack([np.arange(n) * size, np.zeros(n, int)], 1)
    st.add_slide("bench", {"footprint_level0": float(size), "grid_shape": [1, n]}, coords,
                 np.ones(n, np.float32), np.array([0, n]))
    st.slide("bench").group["patches"][:] = pix
    st.slide("bench").group["block_done"][:] = 1
    st.mark_complete("bench")
    return path


def run_embedding(kind: str, store: str, threads: int, weights: str | None) -> dict:
    import torch

    from napari_protodiff.core.embedding import EmbedConfig, embed_store
    from napari_protodiff.core.encoders import load_encoder
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.store import PatchStore

    torch.set_num_threads(threads)
    n = PatchStore(store).slide("bench").n_patches
    pix = np.asarray(PatchStore(store).slide("bench").group["patches"][:])
    bs = 64 if kind == "builtin" else 32
    if kind == "builtin":
        enc = load_encoder("builtin")
        cfg = EmbedConfig(batch_size=bs, overwrite=True)
    else:
        enc = load_encoder(weights, arch="vit_small_patch16_224", device="cpu")
        cfg = EmbedConfig(encoder=weights, arch="vit_small_patch16_224", device="cpu", batch_size=bs, overwrite=True)
    enc.encode(pix[:2])  # warm-up
    t = time.perf_counter()
    if kind == "builtin":
        for i in range(0, n, bs):
            enc.encode(pix[i:i + bs])
    else:
        model, mean, std = enc.model, torch.tensor(enc.mean).view(1, 3, 1, 1), torch.tensor(enc.std).view(1, 3, 1, 1)
        with torch.inference_mode():
            for i in range(0, n, bs):
                xb = torch.from_numpy(pix[i:i + bs]).permute(0, 3, 1, 2).float().div_(255)
                model((xb - mean) / std)
    plain = time.perf_counter() - t
    t = time.perf_counter()
    res = drain(embed_store(store, cfg, encoder=enc))
    ours = time.perf_counter() - t
    return {"kind": kind, "n": n, "plain_per_s": n / plain, "store_per_s": n / ours, "written": res.patches_embedded}


def vit_weights(path: Path) -> Path:
    if not path.exists():
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        m = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


# -- driver -----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="embeddings to cluster (default 1,000,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each fast contender; the median is reported")
    ap.add_argument("--kmeans-repeat", type=int, default=1, help="runs of sklearn KMeans (slow; default 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="*", help="contenders to run (clustering ones, 'embed-builtin', 'embed-vit')")
    ap.add_argument("--builtin-patches", type=int, default=1024)
    ap.add_argument("--vit-patches", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="100,000 rows, 1 repeat, 256/64 patches")
    ap.add_argument("--json-out", help="write every result as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.repeat, args.builtin_patches, args.vit_patches = 100_000, 1, 256, 64
    only = set(args.only or [*CONTENDERS, "embed-builtin", "embed-vit"])
    me, py = str(Path(__file__).resolve()), sys.executable
    data = embeddings(args.rows)
    out: dict = {"rows": args.rows, "dim": D, "k": K, "threads": args.threads, "clustering": {}, "embedding": {}}
    for name in CONTENDERS:
        if name not in only:
            continue
        if name == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                print("faiss: not installed, skipped", file=sys.stderr)
                continue
        reps = args.kmeans_repeat if name == "sklearn-kmeans" else args.repeat
        for _ in range(reps):
            p = subprocess.run([py, me, "_cluster", name, str(data), str(args.threads)], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{name} failed:\n{p.stderr[-2000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            out["clustering"].setdefault(name, []).append(r)
            print(f"{name:<18} {r['seconds']:8.2f} s  inertia {r['inertia']:.6e}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="protodiff-bench-"))
    try:
        for kind, n in (("builtin", args.builtin_patches), ("vit", args.vit_patches)):
            if f"embed-{kind}" not in only:
                continue
            store = make_store(tmp / f"{kind}.zarr", n)
            w = str(vit_weights(DATA / "vit_small_random.safetensors")) if kind == "vit" else ""
            p = subprocess.run([py, me, "_embed", kind, str(store), str(args.threads), w], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"embed {kind} failed:\n{p.stderr[-2000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            out["embedding"][kind] = r
            print(f"embed {kind:<8} store {r['store_per_s']:.1f}/s  plain {r['plain_per_s']:.1f}/s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(out))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


def table(out: dict) -> str:
    lines = [f"Clustering {out['rows']:,} x {out['dim']} float32 into k = {out['k']} ({out['threads']} threads; "
             "median of the runs):", "", "| contender | runs | time (s) | inertia | vs best inertia |",
             "| --- | --- | --- | --- | --- |"]
    meds = {n: (statistics.median(r["seconds"] for r in rs), statistics.median(r["inertia"] for r in rs), len(rs))
            for n, rs in out["clustering"].items()}
    best = min((m[1] for m in meds.values()), default=1.0)
    for n, (sec, ine, reps) in meds.items():
        lines.append(f"| {n} | {reps} | {sec:.2f} | {ine:.6e} | {100 * (ine / best - 1):+.2f}% |")
    if out["embedding"]:
        lines += ["", "| encoder | patches | protodiff embed (store -> store), patches/s | plain loop (in memory), patches/s |",
                  "| --- | --- | --- | --- |"]
        for kind, r in out["embedding"].items():
            lines.append(f"| {'built-in' if kind == 'builtin' else 'ViT-S/16 (224 px)'} | {r['n']} | "
                         f"{r['store_per_s']:.1f} | {r['plain_per_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_cluster":
        print(json.dumps(run_contender(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_embed":
        print(json.dumps(run_embedding(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] or None)))
    else:
        main()
