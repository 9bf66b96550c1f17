"""Sampling at scale: write guided samples into a synthetic patch store, batch by batch.

The synthetic store has the same format as a real one (``docs/patch-store.md``): one
group per sampling run under ``slides/`` (id ``synthetic``, ``synthetic-2``, ...) with
``patches``, ``coords`` (zeros), ``tissue_fraction`` (ones), ``block_start`` /
``block_done`` (one block per batch), plus per patch ``prototype`` (requested id, -1 for
a mixture), ``seed`` and ``guidance``; the group's attributes hold the model's hash,
folder and the sampling configuration. Image *i* is drawn from its own generator seeded
with ``seed + i``, so it does not depend on the batch size, and a run that is stopped
resumes with the missing batches only (a run is recognised by model hash + config); the
group's status is ``"sampling"`` until every batch is written, then ``"complete"``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import StoreError
from ..progress import CancelToken, Progress
from ..store import PatchStore, now
from .config import SampleConfig
from .errors import PrototypeError, SamplingError

RUN_PREFIX = "synthetic"


@dataclass
class SynthesisResult:
    store: str
    run_id: str
    n: int
    written: int
    seconds: float
    model_hash: str
    action: str

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "run_id": self.run_id, "n": self.n, "written": self.written,
                "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 2),
                "model_hash": self.model_hash, "action": self.action}


def parse_prototypes(spec: str | int | list | dict, k: int) -> list[int] | dict[int, float]:
    """``balanced``/``all`` -> all ids; ``"3"``/``"3,5"`` -> ids; ``"3:0.7,5:0.3"`` -> mixture weights."""
    from .pipeline import _check_id

    if isinstance(spec, dict):
        out_w = {int(a): float(b) for a, b in spec.items()}
        for a in out_w:
            _check_id(a, k)
        return out_w
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)]
    if isinstance(spec, (list, tuple)):
        ids = [int(s) for s in spec]
    else:
        text = str(spec).strip().lower()
        if text in ("balanced", "all"):
            return list(range(k))
        try:
            if ":" in text:
                w = {}
                for part in text.split(","):
                    a, b = part.split(":")
                    w[int(a)] = float(b)
                for a, b in w.items():
                    _check_id(a, k)
                    if not b >= 0:
                        raise PrototypeError(f"The weight of prototype {a} must be 0 or positive, not {b}.")
                if sum(w.values()) <= 0:
                    raise PrototypeError("The prototype mixture's weights sum to zero.")
                return w
            ids = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise PrototypeError(f"Cannot read the prototypes '{spec}'; use 'balanced', 'all', ids like '3,5' "
                                 "or weights like '3:0.7,5:0.3'.") from None
    if not ids:
        raise PrototypeError("No prototype given.")
    for i in ids:
        _check_id(i, k)
    return ids


def _find_run(st: PatchStore, model_hash: str, cfg_key: dict) -> str | None:
    for e in st.slides(complete_only=False):
        a = e.attrs
        if a.get("kind") == "synthetic" and a.get("model_hash") == model_hash and a.get("sample_config") == cfg_key:
            return e.slide_id
    return None


def synthesize(model_dir: str | os.PathLike, output: str | os.PathLike, config: SampleConfig | None = None,
               cancel: CancelToken | None = None, pipeline=None) -> Iterator[Progress]:
    """Sample ``config.n`` patches from the model in ``model_dir`` into the store ``output``.

    A generator of progress events (one per denoising step of each batch); returns a
    :class:`SynthesisResult`. ``pipeline``: an already loaded pipeline of that folder.
    """
    import torch

    from .bundle import load_bundle, read_meta
    from .pipeline import to_uint8
    from .training import resolve_device

    cfg = config or SampleConfig()
    t0 = time.perf_counter()
    if cfg.n < 1:
        raise SamplingError(f"The number of samples must be at least 1, not {cfg.n}.")
    meta = read_meta(model_dir)
    device = resolve_device(cfg.device)
    pipe = pipeline or load_bundle(model_dir, device=device)
    k = pipe.num_prototypes
    if cfg.guidance > 0 and pipe.classifier is None:
        raise SamplingError(f"{model_dir}: the model has no prototype classifier; use --guidance 0.")
    if cfg.cfg_scale is not None and not pipe.class_conditional:
        raise SamplingError(f"{model_dir}: the model's UNet was not trained with prototype ids; classifier-free "
                            "guidance (--cfg-scale) needs a model trained with train-diffusion --cfg.")
    request = parse_prototypes(cfg.prototypes, k)
    pipe.set_scheduler(cfg.scheduler)
    model_hash = meta["model_hash"]
    size = int(pipe.vae.config.sample_size)
    mpp = float(meta.get("patch_mpp") or 0.5)
    out = Path(output)
    cfg_key = {key: val for key, val in cfg.model_dump().items() if key not in ("batch_size", "device")}
    if isinstance(request, dict):
        requested = np.full(cfg.n, -1, np.int32)
    else:
        requested = np.array([request[i % len(request)] for i in range(cfg.n)], np.int32)

    if out.exists() and PatchStore.is_store(out):
        st = PatchStore(out, mode="r+")
        if st.patch_size != size:
            raise StoreError(f"{out}: the store holds {st.patch_size}-px patches; this model makes {size}-px "
                             "patches: choose another output.")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out}: exists and is not a patch store; choose another output.")
    else:
        if out.exists():
            out.rmdir()
        st = PatchStore.create(out, size, mpp)
        st._set_meta(content="synthetic")
    run_id = _find_run(st, model_hash, cfg_key)
    action = "resume"
    if run_id is None:
        action = "new"
        run_id = st.unique_slide_id(RUN_PREFIX)
        bs = int(min(cfg.batch_size, cfg.n))
        starts = np.append(np.arange(0, cfg.n, bs), cfg.n).astype(np.int64)
        attrs = {"kind": "synthetic", "model_hash": model_hash, "model_dir": str(Path(model_dir).resolve()),
                 "sample_config": cfg_key, "patch_size": size, "patch_mpp": mpp, "encoder": pipe.encoder_identity,
                 "prototype_weights": {str(a): b for a, b in request.items()} if isinstance(request, dict) else None}
        e = st.add_slide(run_id, attrs, np.zeros((cfg.n, 2), np.int64), np.ones(cfg.n, np.float32), starts)
        g = e.group
        g.create_array("prototype", data=requested, chunks=(max(1, min(cfg.n, 65536)),), dimension_names=("patch",))
        g.create_array("seed", data=(cfg.seed + np.arange(cfg.n)).astype(np.int64), chunks=(max(1, min(cfg.n, 65536)),),
                       dimension_names=("patch",))
        g.create_array("guidance", data=np.full(cfg.n, cfg.guidance, np.float32),
                       chunks=(max(1, min(cfg.n, 65536)),), dimension_names=("patch",))
        g.attrs["protodiff"] = dict(e.attrs, status="sampling")
    entry = st.slide(run_id)
    if entry.complete:
        return SynthesisResult(str(out), run_id, cfg.n, 0, time.perf_counter() - t0, model_hash, "skip")
    g = entry.group
    starts = np.asarray(g["block_start"][:])
    done = entry.blocks_done()
    todo = [b for b in range(len(done)) if not done[b]]
    patches = g["patches"]
    steps_total = len(todo) * cfg.steps
    written = 0
    for bi, b in enumerate(todo):
        s, e_ = int(starts[b]), int(starts[b + 1])
        gens = [torch.Generator(device=device).manual_seed(int(cfg.seed + i)) for i in range(s, e_)]
        protos = request if isinstance(request, dict) else [int(x) for x in requested[s:e_]]
        kwargs = dict(prototypes=protos, num_images=e_ - s, guidance_scale=cfg.guidance, cfg_scale=cfg.cfg_scale,
                      guidance_min_t=cfg.guidance_min_t,
                      num_inference_steps=cfg.steps, generator=gens, output_type="np")
        images = yield from run_pipeline(pipe, kwargs, cancel, bi * cfg.steps, steps_total,
                                         f"batch {b + 1}/{len(done)}")
        patches[s:e_] = to_uint8(images)
        g["block_done"][b] = 1
        written += e_ - s
    st.mark_complete(run_id)
    g.attrs["protodiff"] = dict(st.slide(run_id).attrs, finished=now())
    return SynthesisResult(str(out), run_id, cfg.n, written, time.perf_counter() - t0, model_hash, action)


def run_pipeline(pipe, kwargs: dict, cancel: CancelToken | None = None, offset: int = 0, total: int = 0,
                 label: str = "sampling") -> Iterator[Progress]:
    """Run ``pipe(**kwargs)`` in a worker thread, yielding a progress event per denoising step.

    Returns (StopIteration.value) the output images. Closing the generator or a set
    ``cancel`` token stops the pipeline at its next step (raising ``Cancelled``).
    """
    import queue
    import threading

    from ..errors import Cancelled

    q: "queue.Queue[tuple[str, Any]]" = queue.Queue()
    stop = threading.Event()
    steps = int(kwargs.get("num_inference_steps", 50))
    total = total or steps

    def on_step(p, i, t, kw):
        if stop.is_set() or (cancel is not None and cancel.cancelled):
            raise Cancelled("The job was cancelled.")
        q.put(("step", i + 1))
        return kw

    def work():
        try:
            q.put(("done", pipe(**kwargs, callback_on_step_end=on_step).images))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    th = threading.Thread(target=work, name="protodiff-sampling", daemon=True)
    th.start()
    try:
        while True:
            kind, val = q.get()
            if kind == "step":
                yield Progress(offset + val, total, f"{label}: step {val}/{steps}")
            elif kind == "done":
                return val
            else:
                raise val
    finally:
        stop.set()
        th.join()


def sample_images(model, config: SampleConfig | None = None,
                  cancel: CancelToken | None = None) -> Iterator[Progress]:
    """Sample ``config.n`` patches in memory (no store): for previews in the Synthesize widget.

    ``model``: a model folder or a loaded pipeline. A generator of one progress event per
    denoising step; returns ``(images (n, S, S, 3) uint8, requested prototype per image)``.
    The images equal those :func:`synthesize` writes for the same model and config.
    """
    import torch

    from .bundle import load_bundle
    from .pipeline import to_uint8
    from .training import resolve_device

    cfg = config or SampleConfig()
    device = resolve_device(cfg.device)
    pipe = model if hasattr(model, "unet") else load_bundle(model, device=device)
    if cfg.cfg_scale is not None and not pipe.class_conditional:
        raise SamplingError("The model's UNet was not trained with prototype ids; classifier-free guidance needs a "
                            "model trained with train-diffusion --cfg.")
    request = parse_prototypes(cfg.prototypes, pipe.num_prototypes)
    pipe.set_scheduler(cfg.scheduler)
    protos = request if isinstance(request, dict) else [request[i % len(request)] for i in range(cfg.n)]
    gens = [torch.Generator(device=device).manual_seed(int(cfg.seed + i)) for i in range(cfg.n)]
    kwargs = dict(prototypes=protos, num_images=cfg.n, guidance_scale=cfg.guidance, cfg_scale=cfg.cfg_scale,
                  guidance_min_t=cfg.guidance_min_t,
                  num_inference_steps=cfg.steps, generator=gens, output_type="np")
    images = yield from run_pipeline(pipe, kwargs, cancel, 0, cfg.steps, "sampling")
    req = np.full(cfg.n, -1, np.int32) if isinstance(request, dict) else np.asarray(protos, np.int32)
    return to_uint8(images), req
