"""The shared training loop: checkpoint + resume gives the same weights; a real two-process DDP step."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from napari_protodiff.core.diffusion.classifier import NoiseAwareClassifier, classifier_loss
from napari_protodiff.core.diffusion.config import DiffusionConfig
from napari_protodiff.core.diffusion.training import LoopSettings, train_loop
from napari_protodiff.core.diffusion.unet import build_scheduler
from napari_protodiff.core.progress import drain

CFG = DiffusionConfig.from_preset("tiny")


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return NoiseAwareClassifier(in_channels=4, sample_size=8, num_prototypes=2, channels=(8, 16), time_embed_dim=16)


def _loss(z, y):
    sched = build_scheduler(CFG)

    def fn(model, idx, gen):
        ti = torch.from_numpy(idx)
        return classifier_loss(model, sched, z[ti], y[ti], gen)
    return fn


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    z, y = _data()
    settings = dict(batch_size=16, lr=1e-2, seed=3, ema_decay=0.9, checkpoint_every=2)
    straight = _model()
    drain(train_loop(straight, _loss(z, y), len(z), LoopSettings("c", 6, **settings), tmp_path / "a", torch.device("cpu")))
    first = _model()
    drain(train_loop(first, _loss(z, y), len(z), LoopSettings("c", 4, **settings), tmp_path / "b", torch.device("cpu")))
    assert (tmp_path / "b" / "latest.json").exists()
    assert not list((tmp_path / "b").rglob("*.pt"))  # safetensors + json only
    resumed = _model()
    m = drain(train_loop(resumed, _loss(z, y), len(z), LoopSettings("c", 6, **settings), tmp_path / "b",
                         torch.device("cpu")))
    assert m["resumed_from"] == 4
    assert torch.equal(_flat(resumed), _flat(straight))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, ckpt: str, q) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z, y = _data()
        model = _model()
        before = _flat(model).clone()
        seen = []

        def fn(m, idx, gen):
            seen.extend(idx.tolist())
            return _loss(z, y)(m, idx, gen)

        drain(train_loop(model, fn, len(z), LoopSettings("ddp", 2, batch_size=16, lr=1e-2, seed=0,
                                                         checkpoint_every=1), ckpt, torch.device("cpu")))
        params = _flat(model)
        gathered = [torch.zeros_like(params) for _ in range(world)]
        dist.all_gather(gathered, params)
        shards = [None] * world
        dist.all_gather_object(shards, sorted(set(seen)))
        if rank == 0:
            q.put({"equal": all(torch.equal(gathered[0], g) for g in gathered[1:]),
                   "changed": not torch.equal(before, params),
                   "disjoint": not set(shards[0]) & set(shards[1]),
                   "ranks_mod": [sorted({i % world for i in s}) for s in shards]})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_gloo_replicas_identical(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ckpt"), q), nprocs=2, join=True,
                       start_method="spawn")
    res = q.get(timeout=60)
    assert res["equal"], "DDP replicas diverged"
    assert res["changed"], "training did not change the weights"
    assert res["disjoint"] and res["ranks_mod"] == [[0], [1]], "ranks did not train on their own shards"
    assert (tmp_path / "ckpt" / "latest.json").exists()  # rank 0 wrote the checkpoint
