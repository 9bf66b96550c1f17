"""Pretraining benchmark: protodiff's DINO step against lightly's reference DINO loop, the share
of the CPU's matmul peak a step reaches, and the share of step time spent waiting for data.

In one process, on the same machine state:

* **matmul peak**: the best of several fp32 ``torch.mm`` of 2048² matrices (GFLOP/s), with
  the same torch thread count as the training.
* **protodiff step**: :class:`napari_protodiff.core.ssl.dino.DINO` as the training job runs it
  (teacher on both global crops in one batch, student on the globals and on the locals in
  one batch per resolution, head once, lightly's DINOLoss, per-tensor clipping, AdamW,
  EMA teacher).
* **lightly reference**: the loop of lightly's DINO example (``examples/pytorch/dino.py``):
  student and teacher backbone + ``DINOProjectionHead``, ``update_momentum``, one forward per
  view, ``DINOLoss``, ``cancel_last_layer_gradients``, Adam.

Both use the same timm ViT, head sizes, crops and batch, fed with the same in-memory
views (so the comparison is the training step, not data loading), measured in
alternating rounds so that a change in the machine's load hits both alike. A step's
FLOPs are counted with ``torch.utils.flop_counter``; its share of the peak is
FLOPs / step time / peak.

* **data wait**: ``protodiff pretrain``'s own job on a real patch store (CMU-1-Small-Region
  tiled at the benchmark's patch size), with loader worker processes; the mean of its
  per-step ``data_wait`` (time blocked on the loader / step time) after two warm-up steps.

Run ``.venv/bin/python benchmarks/pretrain.py`` (``--help`` for sizes); it prints a
Markdown table and writes JSON to ``.benchmarks-data/pretrain.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(n: int = 2048, repeats: int = 8) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best / 1e9


class LightlyDINO:
    """lightly's DINO example model (examples/pytorch/dino.py), with the benchmark's backbone and head sizes."""

    def __init__(self, backbone, cfg) -> None:
        import torch
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        dim = backbone.num_features
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp_epochs=5)
        params = list(self.student_backbone.parameters()) + list(self.student_head.parameters())
        self.optimizer = torch.optim.Adam(params, lr=0.001)

    def forward(self, x):
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x):
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

    def step(self, views, epoch: int = 0, momentum_val: float = 0.996):
        from lightly.models.utils import update_momentum

        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum_val)
        update_momentum(self.student_head, self.teacher_head, m=momentum_val)
        global_views = views[:2]
        teacher_out = [self.forward_teacher(view) for view in global_views]
        student_out = [self.forward(view) for view in views]
        loss = self.criterion(teacher_out, student_out, epoch=epoch)
        loss.backward()
        self.student_head.cancel_last_layer_gradients(current_epoch=epoch)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss


class ProtodiffDINO:
    """One step exactly as core.ssl.train runs it."""

    def __init__(self, cfg) -> None:
        import torch

        from napari_protodiff.core.ssl.dino import DINO, Schedules, make_loss, param_groups

        self.cfg = cfg
        self.model = DINO(cfg)
        self.criterion = make_loss(cfg)
        self.opt = torch.optim.AdamW(param_groups(self.model.student), lr=1e-4, weight_decay=cfg.weight_decay)
        self.sched = Schedules(cfg, 100)

    def step(self, views, epoch: int = 0, step: int = 0):
        import torch

        from napari_protodiff.core.ssl.dino import clip_gradients

        with torch.no_grad():
            t_out = self.model.teacher(views[:2])
        s_out = self.model.student(views)
        loss = self.criterion(t_out, s_out, teacher_temp=self.sched.teacher_temp(epoch))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.model.student, self.cfg.clip_grad)
        self.model.student.head.cancel_last_layer_gradients(epoch)
        self.opt.step()
        self.model.update_teacher(self.sched.momentum(step))
        return loss


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_tiny")
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--global-size", type=int, default=64)
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--n-local", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per contender per round")
    ap.add_argument("--data-steps", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / ".benchmarks-data" / "pretrain.json"))
    args = ap.parse_args()

    import torch

    from napari_protodiff.core.ssl import PretrainConfig
    from napari_protodiff.core.ssl.dino import build_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    data_dir = ROOT / ".benchmarks-data" / "pretrain"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    store = data_dir / "cmu.zarr"
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides
    from napari_protodiff.data import SAMPLE_SLIDE

    drain(tile_slides([SAMPLE_SLIDE], store, TilingConfig(size=args.global_size, mpp=0.5)))
    cfg = PretrainConfig(real=[str(store)], preset="tiny", arch=args.arch, patch_size=args.patch_size,
                         global_size=args.global_size, local_size=args.local_size, n_local=args.n_local,
                         batch_size=args.batch_size, out_dim=args.out_dim, hidden_dim=2048, bottleneck_dim=256,
                         drop_path=0.0, workers=args.workers, threads=args.threads)
    B = cfg.batch_size
    torch.manual_seed(0)
    views = [torch.randn(B, 3, cfg.global_size, cfg.global_size) for _ in range(2)]
    views += [torch.randn(B, 3, cfg.local_size, cfg.local_size) for _ in range(cfg.n_local)]

    peak = matmul_peak()
    torch.manual_seed(0)
    ours = ProtodiffDINO(cfg)
    torch.manual_seed(0)
    ref = LightlyDINO(build_backbone(cfg), cfg)
    # warm-up, then FLOPs of one step of each (the same model and views: the same count)
    for m in (ours, ref):
        m.step(views)
    flops = count_flops(lambda: ours.step(views))
    flops_ref = count_flops(lambda: ref.step(views))

    times = {"protodiff": [], "lightly": []}
    for _ in range(args.rounds):
        for name, m in (("protodiff", ours), ("lightly", ref)):
            t = time.perf_counter()
            for _ in range(args.steps):
                m.step(views)
            times[name].append((time.perf_counter() - t) / args.steps)
    step_ours = statistics.median(times["protodiff"])
    step_ref = statistics.median(times["lightly"])
    peak_after = matmul_peak()

    # the real job on a real store, with loader workers: data-wait share
    from napari_protodiff.core.jobs import RunDir
    from napari_protodiff.core.ssl.train import pretrain

    spe = args.data_steps
    job_cfg = cfg.model_copy(update={"images_per_epoch": spe * B, "epochs": 1, "checkpoint_every": 10**6})
    drain(pretrain(job_cfg, data_dir / "run"))
    m = RunDir(data_dir / "run").metrics()[2:]
    data_wait = statistics.mean(r["data_wait"] for r in m)
    job_ips = statistics.median(r["images_per_second"] for r in m)

    peak_gflops = max(peak, peak_after)
    res = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__},
        "config": {k: getattr(cfg, k) for k in ("arch", "patch_size", "global_size", "local_size", "n_local",
                                                "batch_size", "out_dim", "hidden_dim", "bottleneck_dim")},
        "matmul_peak_gflops": peak_gflops, "matmul_peak_before_after": [peak, peak_after],
        "step_flops": flops, "step_flops_lightly": flops_ref,
        "protodiff": {"step_s": step_ours, "images_per_s": B / step_ours, "rounds_s": times["protodiff"]},
        "lightly": {"step_s": step_ref, "images_per_s": B / step_ref, "rounds_s": times["lightly"]},
        "speedup": step_ref / step_ours,
        "peak_share": flops / step_ours / (peak_gflops * 1e9),
        "peak_share_lightly": flops_ref / step_ref / (peak_gflops * 1e9),
        "job": {"images_per_s": job_ips, "data_wait_share": data_wait, "workers": args.workers, "steps": len(m)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    c = res["config"]
    print(f"ViT {c['arch']}, patch {c['patch_size']}, 2 x {c['global_size']} px + {c['n_local']} x {c['local_size']} px "
          f"crops, batch {B}, head {c['hidden_dim']}/{c['bottleneck_dim']}/{c['out_dim']}; {threads} torch threads\n")
    print("| measure | protodiff | lightly reference | target |")
    print("| --- | ---: | ---: | --- |")
    print(f"| training images/s (in-memory views) | {res['protodiff']['images_per_s']:.1f} | "
          f"{res['lightly']['images_per_s']:.1f} | >= 1.0x: **{res['speedup']:.2f}x** |")
    print(f"| share of matmul peak ({peak_gflops:.0f} GFLOP/s fp32) | {res['peak_share']:.0%} | "
          f"{res['peak_share_lightly']:.0%} | >= 60% |")
    print(f"| GFLOP per step | {flops / 1e9:.1f} | {flops_ref / 1e9:.1f} | |")
    print(f"| data wait, real job ({args.workers} workers, zarr store) | {data_wait:.1%} | | < 10% |")
    print(f"| training images/s, real job | {job_ips:.1f} | | |")


if __name__ == "__main__":
    main()
