"""Does a DINO run lower its loss? The same loss for the initial and the trained networks, on
the same held-out views, with the same temperatures and the same centering.

The training log cannot say it by itself: its first steps score the *initial* network against
itself (student and teacher are the same weights) with a center that starts at zero, so the
teacher's output is dominated by the mode every image shares and both networks agree on it;
the loss then rises while the center (momentum 0.9) removes that mode, and only after that
does it fall. Comparing a late epoch with the first one compares two different objectives.

Here, for every run directory of ``benchmarks/pretrain_knn.py`` (``run-seed<N>``), both the
run's initial weights (same seed, same construction) and its last checkpoint (student,
teacher, EMA center) see the same views of the same 512 *query* patches (never trained on),
made by the run's own augmentation with a fixed seed; the DINO loss (lightly's formula: every
teacher global view against every other student view) is computed at the run's final teacher
temperature with

* ``center = 0``: what the first training step saw (initial network only);
* ``center = eval mean``: the mean teacher output on these views, i.e. converged centering,
  the same rule for both networks (the comparison that decides);
* ``center = EMA``: the trained run's own center (trained network only).

It also splits the loss into the teacher's entropy H(t) and KL(t || s) (DINO paper, sec. 5.3):
a collapsed network has H(t) = ln K (uniform) or 0 (one-hot) and KL = 0.

Run ``.venv/bin/python benchmarks/pretrain_loss_eval.py DIR [DIR...]`` on pretrain_knn output
folders (each with s0.zarr..s3.zarr and run-seed<N>/); prints a markdown table and writes
``DIR/loss_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
N_EVAL = 512


def load_query_patches(out: Path) -> np.ndarray:
    """The query half of pretrain_knn's patches (the same split: permutation with seed 0)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pretrain_knn import SLIDES

    from napari_protodiff.core.ssl.data import PatchSource

    raw = []
    for lab in range(len(SLIDES)):
        src = PatchSource(out / f"s{lab}.zarr")
        raw.append(np.stack([src.read(i) for i in range(len(src))]))
    raw = np.concatenate(raw)
    perm = np.random.default_rng(0).permutation(len(raw))
    query = perm[len(raw) // 2 :]
    pick = np.sort(np.random.default_rng(1).choice(query, min(N_EVAL, len(query)), replace=False))
    return raw[pick]


def outputs(model, views_per_patch: list[list], batch: int = 64):
    """Teacher outputs of the 2 global views and student outputs of all views, stacked (V, N, K)."""
    import torch

    t_out, s_out = [], []
    with torch.inference_mode():
        for i in range(0, len(views_per_patch), batch):
            chunk = views_per_patch[i : i + batch]
            views = [torch.stack([v[j] for v in chunk]) for j in range(len(chunk[0]))]
            t_out.append(torch.stack(model.teacher(views[:2])))
            s_out.append(torch.stack(model.student(views)))
    return torch.cat(t_out, 1), torch.cat(s_out, 1)


def dino_loss(t_out, s_out, center, teacher_temp: float, student_temp: float) -> dict:
    """lightly's DINOLoss value, and its split into the teacher's entropy and KL(t || s)."""
    import torch
    import torch.nn.functional as F

    t = F.softmax((t_out - center) / teacher_temp, dim=-1)  # (2, N, K)
    log_t = F.log_softmax((t_out - center) / teacher_temp, dim=-1)
    log_s = F.log_softmax(s_out / student_temp, dim=-1)  # (V, N, K)
    ce = -torch.einsum("tbd,sbd->tsb", t, log_s)  # (2, V, N)
    mask = torch.ones(ce.shape[:2], dtype=torch.bool)
    for i in range(min(ce.shape[0], ce.shape[1])):
        mask[i, i] = False
    loss = float(ce[mask].mean())
    ent = float(-(t * log_t).sum(-1).mean())
    return {"loss": loss, "teacher_entropy": ent, "kl": loss - ent}


def evaluate_run(run: Path, patches: np.ndarray) -> dict:
    import torch

    from napari_protodiff.core.ssl import PretrainConfig
    from napari_protodiff.core.ssl.augment import HEMultiCrop
    from napari_protodiff.core.ssl.dino import DINO, Schedules

    cfg = PretrainConfig(**json.loads((run / "config.json").read_text()))
    aug = HEMultiCrop.from_config(cfg)
    torch.manual_seed(12345)
    views = [aug(p) for p in patches]
    tt = Schedules(cfg, 1).teacher_temp(cfg.epochs - 1)

    torch.manual_seed(cfg.seed)
    init = DINO(cfg).eval()  # the run's initial weights (same seed, same construction as train.py)
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    trained = DINO(cfg).eval()
    trained.student.load_state_dict(state["student"])
    trained.teacher.load_state_dict(state["teacher"])

    res = {"seed": cfg.seed, "step": int(state["step"]), "teacher_temp": tt, "n_patches": len(patches),
           "ln_k": math.log(cfg.out_dim)}
    for name, model in (("init", init), ("trained", trained)):
        t_out, s_out = outputs(model, views)
        eval_mean = t_out.mean(dim=(0, 1), keepdim=True)
        res[f"{name}_eval_mean"] = dino_loss(t_out, s_out, eval_mean, tt, cfg.student_temp)
        if name == "init":
            res["init_center0"] = dino_loss(t_out, s_out, torch.zeros_like(eval_mean), tt, cfg.student_temp)
        else:
            res["trained_ema"] = dino_loss(t_out, s_out, state["center"].reshape(1, 1, -1), tt, cfg.student_temp)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="pretrain_knn output folders")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for d in map(Path, args.dirs):
        patches = load_query_patches(d)
        found = []
        for run in sorted(d.glob("run-seed*")):
            if not (run / "checkpoints" / "last.pt").exists():
                continue
            r = evaluate_run(run, patches)
            found.append(r)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        (d / "loss_eval.json").write_text(json.dumps(found, indent=2))
    print("| seed (steps) | initial, center 0 | initial, eval-mean center | trained, eval-mean center | trained, EMA center |"
          " change (eval-mean center) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        def cell(k):
            v = r[k]
            return f"{v['loss']:.3f} (H {v['teacher_entropy']:.2f}, KL {v['kl']:.2f})"
        change = r["trained_eval_mean"]["loss"] - r["init_eval_mean"]["loss"]
        print(f"| {r['seed']} ({r['step']}) | {cell('init_center0')} | {cell('init_eval_mean')} | "
              f"{cell('trained_eval_mean')} | {cell('trained_ema')} | {change:+.3f} |")
    print(f"\nln K = {rows[0]['ln_k']:.3f}; teacher temperature {rows[0]['teacher_temp']}; "
          f"{rows[0]['n_patches']} held-out patches, 2 global + local views each")


if __name__ == "__main__":
    main()
