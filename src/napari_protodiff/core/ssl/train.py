"""The DINO pretraining job: a generator of progress events writing a run directory.

``pretrain(config, run_dir)`` trains, checkpoints (``checkpoints/last.pt`` every
``checkpoint_every`` steps, at every epoch end and when cancelled), logs one metrics
record per step (``metrics.jsonl``) and finally exports the teacher backbone to
``outputs/encoder`` (see :mod:`.export`). ``resume=True`` continues an interrupted
run of the same configuration from its last checkpoint: the data plan, augmentations,
schedules, optimiser, teacher centre and random state all continue where they stopped,
so the run ends with the same weights as an uninterrupted one (on the same machine).

Under ``torchrun`` (``WORLD_SIZE > 1``) each process trains on its slice of every
step's images with DistributedDataParallel (gloo on CPU, NCCL on GPUs); process 0
writes the run directory.

Checkpoints are written by this package (``torch.save``) and read back with
``torch.load(weights_only=True)``, which unpickles no code.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import Cancelled, ProtodiffError
from ..jobs import RunDir, RunDirError, now
from ..progress import CancelToken, Progress
from .config import PretrainConfig

KIND = "pretrain"
CHECKPOINT = "last.pt"


@dataclass
class PretrainResult:
    run_dir: str
    encoder: str
    steps: int
    epochs: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    images_per_second: float
    resumed_from: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _store_fingerprint(path: str) -> str:
    """A hash of a store's metadata: slide content hashes, patch counts, status."""
    import json

    from ..jobs import config_hash
    from ..store import PatchStore

    st = PatchStore(path)
    meta = {"patch_size": st.patch_size, "mpp": st.mpp,
            "slides": [[e.slide_id, e.attrs.get("content_hash"), e.n_patches, e.status] for e in st.slides(False)]}
    return config_hash(json.loads(json.dumps(meta, default=str)))


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(cfg: PretrainConfig, local_rank: int):
    import torch

    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ProtodiffError(f"Device '{cfg.device}' asked for, but torch sees no CUDA GPU here.")
    d = torch.device(cfg.device)
    if d.type == "cuda" and d.index is None:
        d = torch.device(f"cuda:{local_rank}")
    return d


def checkpoint_path(rd: RunDir) -> Path:
    return rd.checkpoints / CHECKPOINT


def load_checkpoint(path: Path, device) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise RunDirError(
            f"{path}: the checkpoint is corrupt or unreadable ({type(exc).__name__}); delete it to start the run "
            "again from the beginning."
        ) from None


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def pretrain(config: PretrainConfig, run_dir: str | os.PathLike, resume: bool = False,
             cancel: CancelToken | None = None) -> Iterator[Progress]:
    """Train DINO as ``config`` says, in ``run_dir``; yields progress, returns a :class:`PretrainResult`."""
    import torch
    import torch.distributed as dist

    from .data import HybridSampler, open_sources

    cfg = config
    rank, world, local_rank = _dist_env()
    if world > 1 and not dist.is_initialized():
        dev0 = _device(cfg, local_rank)
        dist.init_process_group(backend="nccl" if dev0.type == "cuda" else "gloo")
    own_group = world > 1
    try:
        # -- inputs: every process checks them (one sentence on bad input) ---------------------------
        yield Progress(0, 0, "opening patch stores")
        sources = open_sources(cfg.real, cfg.synthetic, cfg.resize)
        sampler = HybridSampler([len(s) for s in sources], [s.kind for s in sources], cfg.real_fraction,
                                cfg.images_per_epoch, cfg.batch_size, cfg.seed, rank, world)
        spe = sampler.steps_per_epoch
        if spe < 1:
            raise ProtodiffError(f"images_per_epoch ({cfg.images_per_epoch}) is smaller than one step's images "
                                 f"({cfg.batch_size} x {world} processes).")
        total = spe * cfg.epochs
        device = _device(cfg, local_rank)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

        # -- the run directory (process 0), then everyone agrees it is usable -----------------------
        rd: RunDir | None = None
        err: Exception | None = None
        if rank == 0:
            try:
                rd = RunDir.prepare(
                    run_dir, KIND, cfg.model_dump(mode="json"), resume=resume, hash_config=cfg.identity(),
                    manifest={"seed": cfg.seed, "world_size": world,
                              "inputs": {s: _store_fingerprint(s) for s in [*cfg.real, *cfg.synthetic]}},
                )
            except Exception as exc:  # reported after the others learn of it
                err = exc
        if world > 1:
            flag = torch.tensor([0 if err is not None else 1])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if err is None and int(flag) == 0:
                raise ProtodiffError(f"{run_dir}: process 0 could not prepare the run directory; see its message.")
        if err is not None:
            raise err
        if rd is None:
            rd = RunDir(Path(run_dir))

        if resume and rd.status.get("state") == "finished" and (rd.outputs / "summary.json").is_file():
            import json

            yield Progress(total, total, "already finished")
            return PretrainResult(**json.loads((rd.outputs / "summary.json").read_text()))
        gen = _train(cfg, rd, rank, world, device, sources, sampler, total, spe, resume, cancel)
        if rank == 0:
            with rd.running(step=0, total=total):
                result = yield from gen
        else:
            result = yield from gen
        return result
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: PretrainConfig, rd: RunDir, rank: int, world: int, device, sources, sampler, total: int, spe: int,
           resume: bool, cancel: CancelToken | None) -> Iterator[Progress]:
    import torch
    import torch.distributed as dist

    from .augment import HEMultiCrop
    from .data import REAL, MultiCropDataset, make_loader
    from .dino import DINO, Schedules, clip_gradients, make_loss, param_groups
    from .export import encoder_config, export_encoder

    main = rank == 0
    t_start = time.perf_counter()

    # -- model, loss, optimiser --------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = DINO(cfg).to(device)
    criterion = make_loss(cfg).to(device)
    opt = torch.optim.AdamW(param_groups(model.student), lr=0.0, weight_decay=cfg.weight_decay)
    sched = Schedules(cfg, spe, world)
    torch.manual_seed(cfg.seed + 1 + 1000 * rank)  # drop-path etc. (differs per process)

    start = 0
    ckpt = checkpoint_path(rd)
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, device)
        if int(state.get("world", 1)) != world:
            raise RunDirError(f"{rd.path}: the run was started with {state.get('world')} process(es), not {world}; "
                              "resume it with the same number.")
        try:
            model.student.load_state_dict(state["student"])
            model.teacher.load_state_dict(state["teacher"])
            opt.load_state_dict(state["optimizer"])
            criterion.center.copy_(state["center"])
            torch.set_rng_state(state["rng"][rank].cpu() if isinstance(state["rng"], list) else state["rng"].cpu())
        except (KeyError, RuntimeError, ValueError, IndexError) as exc:
            raise RunDirError(f"{ckpt}: the checkpoint does not fit this run ({type(exc).__name__}); delete it to "
                              "start again from the beginning.") from None
        start = int(state["step"])
        if main:
            rd.truncate_metrics(start)
            rd.log(f"resumed from step {start}")
    elif main:
        rd.truncate_metrics(0)
    student = model.student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        student = DDP(model.student, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int) -> None:
        rng = torch.get_rng_state()
        if world > 1:
            gathered = [torch.zeros_like(rng) for _ in range(world)]
            dist.all_gather(gathered, rng)
            rng = gathered
        if main:
            _save_checkpoint(ckpt, {"step": step, "world": world, "student": model.student.state_dict(),
                                    "teacher": model.teacher.state_dict(), "optimizer": opt.state_dict(),
                                    "center": criterion.center.detach().clone(), "rng": rng, "saved": now()})

    dataset = MultiCropDataset(sources, HEMultiCrop.from_config(cfg))
    loader = make_loader(dataset, sampler, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda",
                         seed=cfg.seed)
    stop = {"signal": None}

    def on_signal(signum, frame):
        # SIGTERM (cancel from the Jobs widget, torchrun) or SIGINT (Ctrl-C, sent by the terminal to the
        # whole process group, loader workers included): finish the step, checkpoint, end as cancelled.
        # A second Ctrl-C interrupts at once (the run still ends as cancelled, from its last checkpoint).
        if signum == signal.SIGINT and stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum

    old_handlers: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                continue  # a job started in a script's background ignores Ctrl-C, as its shell meant
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread (napari worker): the cancel token is the way
            break

    first_loss = last_loss = None
    step = start
    n_images = 0
    t_train = time.perf_counter()
    if main:
        rd.set_status("running", step=start, total=total, message=f"step {start}/{total}")
    yield Progress(start, total, f"step {start}/{total}")
    it = None
    try:
        while step < total:
            epoch = step // spe
            sampler.epoch, sampler.start_step = epoch, step - epoch * spe
            it = iter(loader)
            tt = sched.teacher_temp(epoch)
            t_wait = t_tot = 0.0
            t_prev = time.perf_counter()
            for views, kinds, _src in it:
                t_got = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = sched.lr(step)
                    if g.get("apply_wd"):
                        g["weight_decay"] = sched.weight_decay(step)
                views = [v.to(device, non_blocking=True) for v in views]
                with torch.no_grad():
                    t_out = model.teacher(views[:2])
                s_out = student(views)
                loss = criterion(t_out, s_out, teacher_temp=tt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = clip_gradients(model.student, cfg.clip_grad)
                model.student.head.cancel_last_layer_gradients(epoch)
                opt.step()
                model.update_teacher(sched.momentum(step))
                step += 1
                n_real = int((kinds == REAL).sum())
                stats = torch.tensor([float(loss.detach()), n_real, len(kinds) - n_real], dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(stats)
                    stats[0] /= world
                lval = float(stats[0])
                if lval != lval:  # NaN
                    raise ProtodiffError(f"{rd.path}: the DINO loss became NaN at step {step}; lower --lr or "
                                         "raise --warmup-epochs.")
                first_loss = lval if first_loss is None else first_loss
                last_loss = lval
                n_images += len(kinds) * world
                t_now = time.perf_counter()
                t_wait += t_got - t_prev
                t_tot += t_now - t_prev
                rec = {"step": step, "epoch": epoch, "loss": lval, "lr": sched.lr(step - 1),
                       "weight_decay": sched.weight_decay(step - 1), "momentum": sched.momentum(step - 1),
                       "teacher_temp": tt, "grad_norm": gnorm, "n_real": int(stats[1]), "n_synthetic": int(stats[2]),
                       "images_per_second": len(kinds) * world / max(1e-9, t_now - t_prev),
                       "data_wait": (t_got - t_prev) / max(1e-9, t_now - t_prev)}
                t_prev = t_now
                if main and (step % cfg.log_every == 0 or step == total):
                    rd.append_metrics(rec)
                end_of_epoch = step % spe == 0
                if step % cfg.checkpoint_every == 0 or end_of_epoch or step == total:
                    save(step)
                if main:
                    rd.set_status("running", step=step, total=total, message=f"epoch {epoch + 1}/{cfg.epochs}, "
                                  f"step {step}/{total}, loss {lval:.4f}")
                try:
                    yield Progress(step, total, f"epoch {epoch + 1}/{cfg.epochs} loss {lval:.4f}", rec)
                except GeneratorExit:  # the consumer stopped listening: keep this step's work
                    if world == 1 and not (step % cfg.checkpoint_every == 0 or end_of_epoch or step == total):
                        save(step)
                    raise
                if (cancel is not None and cancel.cancelled) or stop["signal"] is not None:
                    if not (step % cfg.checkpoint_every == 0 or end_of_epoch or step == total):
                        save(step)
                    raise Cancelled(f"Pretraining cancelled at step {step}/{total}; resume with --resume.")
                if end_of_epoch and main:
                    rd.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {lval:.4f}, data wait {t_wait / max(t_tot, 1e-9):.1%}")
            it = None
        seconds = time.perf_counter() - t_train

        # -- export the teacher backbone -----------------------------------------------------------------
        enc_dir = rd.outputs / "encoder"
        if main:
            yield Progress(total, total, "exporting the teacher backbone")
            training = {"method": "dino", "run_dir": str(rd.path.resolve()), "steps": total, "epochs": cfg.epochs,
                        "real": cfg.real, "synthetic": cfg.synthetic, "real_fraction": cfg.real_fraction,
                        "seed": cfg.seed, "final_loss": last_loss, "finished": now()}
            ref = sources[0]
            export_encoder(model.teacher.backbone, enc_dir,
                           encoder_config(cfg, model.embed_dim, ref.mpp, ref.patch_size, training))
        if main:
            first_loss = next((m.get("loss") for m in rd.metrics()), first_loss)
        result = PretrainResult(str(rd.path), str(enc_dir), total, cfg.epochs, first_loss, last_loss,
                                time.perf_counter() - t_start, n_images / max(seconds, 1e-9), start)
        if main:
            import json

            (rd.outputs / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
            rd.set_status("finished", step=total, total=total, message=f"finished: loss {last_loss}",
                          encoder=str(enc_dir))
            rd.log(f"finished; encoder exported to {enc_dir}")
        if world > 1:
            dist.barrier()
        return result
    finally:
        del it
        del loader
        for sig, handler in old_handlers.items():
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass
