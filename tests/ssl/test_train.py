"""DINO training: resume equals uninterrupted, export and load, bad input, the CLI, DDP with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_protodiff.core.errors import ProtodiffError
from napari_protodiff.core.progress import CancelToken, drain


def _weights(run_dir):
    import torch

    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_config, tmp_path):
    import torch

    from napari_protodiff.core.jobs import RunDir
    from napari_protodiff.core.ssl.train import pretrain

    cfg = tiny_config(epochs=2, images_per_epoch=12, drop_path=0.1)  # 3 steps an epoch; drop-path uses the RNG
    full = drain(pretrain(cfg, tmp_path / "full"))
    assert full.steps == 6

    token = CancelToken()
    with pytest.raises(ProtodiffError, match="cancelled at step 4/6"):
        for ev in pretrain(cfg, tmp_path / "cut", cancel=token):
            if ev.step == 4:  # mid-epoch
                token.cancel()
    rd = RunDir.open(tmp_path / "cut")
    assert rd.state == "cancelled" and not (rd.outputs / "encoder").exists()
    with pytest.raises(ProtodiffError, match="pass --resume"):
        drain(pretrain(cfg, tmp_path / "cut"))
    resumed = drain(pretrain(cfg, tmp_path / "cut", resume=True))
    assert resumed.resumed_from == 4 and rd.state == "finished"

    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert torch.equal(a["center"], b["center"])
    la = [m["loss"] for m in RunDir(tmp_path / "full").metrics()]
    lb = [m["loss"] for m in rd.metrics()]
    assert [m["step"] for m in rd.metrics()] == list(range(1, 7)) and la == lb


def test_exported_encoder_loads_by_run_dir_and_by_name(tiny_config, tmp_path, monkeypatch, real_store):
    import numpy as np
    import torch

    from napari_protodiff.core.ssl.data import PatchSource
    from napari_protodiff.core.ssl.export import embed_patches, load_encoder, register_encoder
    from napari_protodiff.core.ssl.train import pretrain

    monkeypatch.setenv("PROTODIFF_HOME", str(tmp_path / "home"))
    res = drain(pretrain(tiny_config(epochs=1, images_per_epoch=8), tmp_path / "run"))
    model, cfg = load_encoder(tmp_path / "run")
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["input_size"] == 32 and cfg["patch_mpp"] == 1.0
    teacher = _weights(tmp_path / "run")["teacher"]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], teacher["backbone." + k]) for k in sd)
    src = PatchSource(real_store)
    feats = embed_patches(model, cfg, np.stack([src.read(i) for i in range(5)]))
    assert feats.shape == (5, 192) and np.isfinite(feats).all()
    register_encoder("skin-dino", res.encoder)
    assert load_encoder("skin-dino")[1]["path"] == res.encoder

    # the encoder registry (what embed, prototypes and evaluate use) finds it by run dir and by name
    from napari_protodiff.core.encoders import load_encoder as registry_load

    for spec in (str(tmp_path / "run"), "skin-dino"):
        enc = registry_load(spec, device="cpu")
        assert enc.dim == 192 and enc.input_size == 32 and enc.mpp == 1.0
        np.testing.assert_allclose(enc.encode(np.stack([src.read(i) for i in range(5)])), feats, atol=1e-4)


def test_bad_inputs_one_sentence_each(tiny_config, tmp_path, real_store, other_store, store_48px, store_2mpp,
                                      empty_store):
    from pydantic import ValidationError

    from napari_protodiff.core.jobs import RunDir
    from napari_protodiff.core.ssl import PretrainConfig
    from napari_protodiff.core.ssl.train import pretrain

    with pytest.raises(ValidationError, match=r"real fraction must be between 0 and 1 \(got 1.5\)"):
        tiny_config(synthetic=[str(other_store)], real_fraction=1.5)
    for store, what in ((store_48px, "48 px"), (store_2mpp, "2 µm/px")):
        with pytest.raises(ProtodiffError, match=f"{what}.*pass --resize") as e:
            drain(pretrain(tiny_config(synthetic=[str(store)], real_fraction=0.5), tmp_path / "mix"))
        assert str(e.value).count(". ") == 0
    assert not (tmp_path / "mix").exists()  # nothing written for bad input
    # resampling was asked for: the 2 µm/px store is read at 1 µm/px
    drain(pretrain(tiny_config(synthetic=[str(store_2mpp)], real_fraction=0.5, resize=True, epochs=1,
                               images_per_epoch=4), tmp_path / "resized"))
    with pytest.raises(ProtodiffError, match="empty"):
        drain(pretrain(PretrainConfig(real=[str(empty_store)], **{"batch_size": 4}), tmp_path / "e"))

    # a run directory that belongs to another job
    drain(pretrain(tiny_config(epochs=1, images_per_epoch=4), tmp_path / "run"))
    with pytest.raises(ProtodiffError, match="belongs to another pretrain job"):
        drain(pretrain(tiny_config(epochs=1, images_per_epoch=4, seed=3), tmp_path / "run", resume=True))
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "x.txt").write_text("mine")
    with pytest.raises(ProtodiffError, match="not a protodiff run directory"):
        drain(pretrain(tiny_config(), tmp_path / "notrun"))

    # a corrupt checkpoint: one sentence, and the run is marked failed, not finished
    cfg = tiny_config(epochs=2, images_per_epoch=4)
    token = CancelToken()
    with pytest.raises(ProtodiffError):
        for ev in pretrain(cfg, tmp_path / "corrupt", cancel=token):
            if ev.step == 1:
                token.cancel()
    ck = tmp_path / "corrupt" / "checkpoints" / "last.pt"
    ck.write_bytes(ck.read_bytes()[: 1000])
    with pytest.raises(ProtodiffError, match="checkpoint is corrupt or unreadable.*delete it"):
        drain(pretrain(cfg, tmp_path / "corrupt", resume=True))
    rd = RunDir.open(tmp_path / "corrupt")
    assert rd.state == "failed" and "corrupt" in rd.status["error"]
    assert not (rd.outputs / "encoder").exists()


@pytest.fixture
def cli(capsys):
    """Run ``protodiff ARGS`` in this process (the CLI's behaviour, without a new interpreter importing torch
    each time; test_ddp_two_cpu_processes_with_gloo runs it as real processes): (exit status, stdout, stderr)."""
    import torch

    from napari_protodiff.cli import main

    threads = torch.get_num_threads()  # --threads sets them for the process

    def run(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


TINY_CLI = ["--batch-size", "4", "--images-per-epoch", "8", "--epochs", "1", "--n-local", "2", "--out-dim", "256",
            "--workers", "0", "--threads", "1"]


def test_cli_pretrain_jobs_and_errors(real_store, other_store, store_48px, tmp_path, cli):
    run = tmp_path / "run"
    r = cli("pretrain", "--real", real_store, "--synthetic", other_store, "--real-fraction", "0.5", "-o", run,
             *TINY_CLI)
    assert r.returncode == 0, r.stderr
    assert "use it as --encoder" in r.stdout
    r = cli("jobs", "show", run, "--json")
    s = json.loads(r.stdout)
    assert s["state"] == "finished" and s["kind"] == "pretrain" and s["step"] == s["total"] == 2
    from napari_protodiff.core.jobs import RunDir

    m = RunDir.open(run).metrics()
    assert sum(x["n_real"] for x in m) == 4 and sum(x["n_synthetic"] for x in m) == 4  # 8 images at 0.5
    import shutil

    shutil.copytree(real_store, tmp_path / "copy.zarr")
    r = cli("embed", tmp_path / "copy.zarr", "--encoder", run, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)  # embedded with the pretrained encoder, named by its run directory
    r = cli("jobs", "list", tmp_path)
    assert r.returncode == 0 and "finished" in r.stdout and str(run) in r.stdout
    r = cli("pretrain", "--real", real_store, "--real-fraction", "-0.1", "-o", tmp_path / "x", *TINY_CLI)
    assert r.returncode == 2 and r.stderr.strip() == \
        "protodiff: error: The real fraction must be between 0 and 1 (got -0.1)."
    r = cli("pretrain", "--real", real_store, "--synthetic", store_48px, "--real-fraction", "0.5", "-o",
             tmp_path / "y", *TINY_CLI)
    assert r.returncode == 2 and "pass --resize" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "y").exists()
    r = cli("jobs", "show", tmp_path / "nothing")
    assert r.returncode == 2 and "no such run directory" in r.stderr


def test_ddp_two_cpu_processes_with_gloo(real_store, tmp_path):
    """A real torchrun job: two processes, gloo, each on half of every step's images."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "napari_protodiff.cli", "pretrain", "--real", str(real_store), "-o", str(run), "--batch-size", "2",
           "--images-per-epoch", "8", "--epochs", "1", "--n-local", "1", "--out-dim", "128", "--workers", "0",
           "--threads", "1", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    from napari_protodiff.core.jobs import RunDir

    rd = RunDir.open(run)
    assert rd.state == "finished" and rd.manifest["world_size"] == 2
    m = rd.metrics()
    assert [x["step"] for x in m] == [1, 2]  # 8 images / (2 per process x 2 processes)
    assert all(x["n_real"] == 4 for x in m)  # counted over both processes (2 each)
    assert (rd.outputs / "encoder" / "model.safetensors").is_file()
