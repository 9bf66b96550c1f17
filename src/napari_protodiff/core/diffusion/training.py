"""One training loop for the autoencoder, the UNet and the classifier.

:func:`train_loop` is a generator of :class:`~napari_protodiff.core.progress.Progress`
events. It gives every model the same machinery:

* AdamW, gradient clipping, optional EMA weights (``diffusers.training_utils.EMAModel``);
* bf16/fp16 autocast and gradient checkpointing when a CUDA GPU is used;
* **data parallel** training when ``torch.distributed`` is initialised (``torchrun``,
  ``accelerate launch`` or :func:`init_distributed`): the loss is wrapped in a module
  and that module in ``DistributedDataParallel``, each rank draws its batches from its
  own shard (every ``world_size``-th item), only rank 0 writes checkpoints;
* **checkpoints and resume**: every ``checkpoint_every`` steps the weights, EMA, optimizer
  state and step are written to ``ckpt_dir/step-N`` (safetensors + JSON: nothing is
  pickled) and ``ckpt_dir/latest.json`` is pointed at it; a new run resumes from it.
  Batches are drawn from generators seeded by (seed, step, rank), so a resumed run
  sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..progress import CancelToken, Progress


@dataclass
class LoopSettings:
    name: str
    steps: int
    batch_size: int
    lr: float
    seed: int
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    ema_decay: float = 0.0
    checkpoint_every: int = 200
    mixed_precision: str = "auto"
    gradient_checkpointing: str = "auto"


# -- distributed -----------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None) -> bool:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, ...) if present."""
    import torch.distributed as dist

    if dist.is_initialized() or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return dist.is_initialized()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        rank_local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{rank_local}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _LossModule(nn.Module):
    """``forward(batch_idx, generator)`` = the loss of ``model`` on that batch (what DDP wraps)."""

    def __init__(self, model: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, idx, generator):
        return self.fn(self.model, idx, generator)


# -- checkpoints (safetensors + json, never pickle) ------------------------------------------------
def _save_checkpoint(folder: Path, step: int, model: nn.Module, opt, ema) -> None:
    from safetensors.torch import save_file

    tmp = folder.parent / (folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    osd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in osd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{key}"] = val.detach().contiguous().cpu()
            else:
                state_meta[f"{pid}.{key}"] = val
    if tensors:
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta: dict[str, Any] = {"step": step, "param_groups": osd["param_groups"], "state_scalars": state_meta}
    if ema is not None:
        sd = ema.state_dict()
        save_file({f"ema.{i}": p.detach().contiguous().cpu() for i, p in enumerate(sd.pop("shadow_params"))},
                  str(tmp / "ema.safetensors"))
        meta["ema"] = {k: v for k, v in sd.items() if isinstance(v, (int, float, bool, str)) or v is None}
    (tmp / "state.json").write_text(json.dumps(meta, default=float))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    latest = folder.parent / "latest.json"
    (folder.parent / "latest.json.tmp").write_text(json.dumps({"step": step, "folder": folder.name}))
    os.replace(folder.parent / "latest.json.tmp", latest)
    for old in folder.parent.glob("step-*"):  # keep the newest only
        if old.name != folder.name and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt_dir: Path, model: nn.Module, opt, ema) -> int:
    from safetensors.torch import load_file

    latest = ckpt_dir / "latest.json"
    if not latest.exists():
        return 0
    folder = ckpt_dir / json.loads(latest.read_text())["folder"]
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state: dict[int, dict[str, Any]] = {}
    if (folder / "optimizer.safetensors").exists():
        for k, v in load_file(str(folder / "optimizer.safetensors")).items():
            pid, key = k.split(".", 1)
            state.setdefault(int(pid), {})[key] = v
    for k, v in meta.get("state_scalars", {}).items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if ema is not None and (folder / "ema.safetensors").exists():
        shadow = load_file(str(folder / "ema.safetensors"))
        sd = dict(meta.get("ema", {}))
        sd["shadow_params"] = [shadow[f"ema.{i}"] for i in range(len(shadow))]
        ema.load_state_dict(sd)
    return int(meta["step"])


# -- the loop --------------------------------------------------------------------------------------
def _autocast(device: torch.device, mode: str):
    import contextlib

    if device.type != "cuda" or mode == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def train_loop(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, np.ndarray, torch.Generator], tuple[torch.Tensor, dict]],
    n_items: int,
    settings: LoopSettings,
    ckpt_dir: str | os.PathLike | None,
    device: torch.device,
    cancel: CancelToken | None = None,
) -> Iterator[Progress]:
    """Train ``model`` for ``settings.steps`` steps; returns (StopIteration.value) a metrics dict.

    ``loss_fn(model, batch_indices, generator)`` returns (loss tensor, float metrics).
    On return, the model holds the EMA weights when EMA is used.
    """
    s = settings
    rank, world = dist_info()
    model.to(device).train()
    if device.type == "cuda" and s.gradient_checkpointing in ("auto", "on") and \
            getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    ema = None
    if s.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=s.ema_decay)
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    start = _load_checkpoint(ckpt, model, opt, ema) if ckpt else 0
    if ema is not None:
        ema.to(device)
    wrapped: nn.Module = _LossModule(model, loss_fn)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    mp = s.mixed_precision if s.mixed_precision != "auto" else "bf16"
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and mp == "fp16") else None
    shard = np.arange(rank, n_items, world)
    per_rank = max(1, s.batch_size // world)
    t0, last, hist = time.perf_counter(), {}, []
    yield Progress(start, s.steps, f"{s.name}: step {start}/{s.steps}" + (" (resumed)" if start else ""))
    for step in range(start, s.steps):
        if cancel is not None:
            cancel.raise_if_cancelled()
        rng = np.random.default_rng([s.seed, step, rank])
        idx = np.sort(shard[rng.choice(len(shard), size=min(per_rank, len(shard)), replace=len(shard) < per_rank)])
        gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        with _autocast(device, mp):
            loss, metrics = wrapped(idx, gen)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        gnorm = float(nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if ema is not None:
            ema.step(model.parameters())
        last = dict(metrics, loss=float(loss.detach()), grad_norm=gnorm)
        hist.append(last["loss"])
        done = step + 1
        if ckpt is not None and rank == 0 and (done % s.checkpoint_every == 0 or done == s.steps):
            _save_checkpoint(ckpt / f"step-{done}", done, model, opt, ema)
        if done % 10 == 0 or done == s.steps:
            yield Progress(done, s.steps, f"{s.name}: step {done}/{s.steps} loss {last['loss']:.4f}", last)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if ema is not None:
        ema.copy_to(model.parameters())
    model.eval()
    tail = hist[-max(1, len(hist) // 10):] if hist else []
    return {"steps": s.steps, "resumed_from": start, "seconds": round(time.perf_counter() - t0, 2),
            "final_loss": round(float(np.mean(tail)), 5) if tail else None, **{k: round(v, 5) for k, v in last.items()}}
