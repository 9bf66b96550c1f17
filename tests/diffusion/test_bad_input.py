"""Bad input: one clear sentence each, exit status 2 from the CLI, nothing half-written looking complete."""

from __future__ import annotations

import json
import shutil

import pytest

from napari_protodiff.cli import main
from napari_protodiff.core.diffusion.bundle import load_bundle
from napari_protodiff.core.diffusion.config import DiffusionConfig, SampleConfig
from napari_protodiff.core.diffusion.errors import ModelError, PrototypeError, SamplingError
from napari_protodiff.core.diffusion.pipeline import target_weights
from napari_protodiff.core.diffusion.synthesize import parse_prototypes


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("protodiff: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.slow
def test_model_folder_problems(tiny_model, tmp_path, capsys):
    src = tiny_model[0]
    with pytest.raises(ModelError, match="no such model folder"):
        load_bundle(tmp_path / "nope")
    broken = tmp_path / "other-version"
    shutil.copytree(src, broken)
    meta = json.loads((broken / "protodiff.json").read_text())
    (broken / "protodiff.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ModelError, match="format version 99"):
        load_bundle(broken)
    (broken / "protodiff.json").write_text(json.dumps(meta))
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelError, match="no 'unet' part"):
        load_bundle(broken)
    (broken / "protodiff.json").unlink()
    with pytest.raises(ModelError, match="incomplete"):
        load_bundle(broken)
    err = _one_line_error(capsys, ["sample", str(broken), "-n", "2", "-o", str(tmp_path / "s.zarr")])
    assert "incomplete" in err and not (tmp_path / "s.zarr").exists()


def test_prototype_requests():
    with pytest.raises(PrototypeError, match="Prototype 7 does not exist"):
        parse_prototypes("3,7", 8 - 4)
    with pytest.raises(PrototypeError, match="Cannot read the prototypes"):
        parse_prototypes("three", 4)
    with pytest.raises(PrototypeError, match="sum to zero"):
        parse_prototypes("0:0,1:0", 4)
    assert parse_prototypes("all", 3) == [0, 1, 2]
    assert parse_prototypes("1:3,2:1", 3) == {1: 3.0, 2: 1.0}
    w, req = target_weights([0, 2], 4, 3)
    assert req.tolist() == [0, 2, 0, 2] and w.sum(1).tolist() == [1, 1, 1, 1]
    with pytest.raises(PrototypeError):
        target_weights(-1, 2, 3)


def test_sample_config_limits():
    for bad in (-1.0, float("nan"), 1e6):
        with pytest.raises(ValueError):
            SampleConfig(guidance=bad)
    with pytest.raises(ValueError):
        SampleConfig(n=0)
    with pytest.raises(ValueError):
        DiffusionConfig.from_preset("huge")


@pytest.mark.slow
def test_cli_sampling_errors(tiny_model, tiny_pipe, tmp_path, capsys):
    model = str(tiny_model[0])
    out = str(tmp_path / "s.zarr")
    assert "Prototype 5 does not exist" in _one_line_error(capsys, ["sample", model, "-n", "2", "--prototypes", "5", "-o", out])
    assert "guidance" in _one_line_error(capsys, ["sample", model, "-n", "2", "--guidance", "-1", "-o", out])
    assert "absurd" in _one_line_error(capsys, ["sample", model, "-n", "2", "--guidance", "5000", "-o", out])
    assert "at least 1" in _one_line_error(capsys, ["sample", model, "-n", "0", "-o", out])
    assert "classifier-free" in _one_line_error(capsys, ["sample", model, "-n", "2", "--cfg-scale", "2", "-o", out])
    with pytest.raises(SamplingError):
        tiny_pipe(prototypes=0, num_images=0, guidance_scale=1.0)
    for bad in (0.0, -1.0):
        with pytest.raises(SamplingError, match="clip of the guided clean latent"):
            tiny_pipe(prototypes=0, num_images=1, guidance_scale=1.0, guidance_x0_clip=bad)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(SamplingError, match="lowest noise level that is guided"):
            tiny_pipe(prototypes=0, num_images=1, guidance_scale=1.0, guidance_min_t=bad)
    err = _one_line_error(capsys, ["sample", model, "-n", "2", "--guidance-min-t", "1", "-o", out])
    assert "guidance_min_t" in err or "less than 1" in err, err


def test_store_without_prototypes(tmp_path, he_png, capsys):
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    store = tmp_path / "plain.zarr"
    drain(tile_slides([he_png], store, TilingConfig(size=32, mpp=2.0, mpp_override=0.5)))
    err = _one_line_error(capsys, ["train-diffusion", str(store), "-o", str(tmp_path / "m")])
    assert "no prototypes" in err
    assert not (tmp_path / "m" / "protodiff.json").exists()


@pytest.mark.slow
def test_interrupted_training_is_not_a_model(two_proto_store, tmp_path):
    from napari_protodiff.core.diffusion.fit import train_diffusion
    from napari_protodiff.core.errors import Cancelled
    from napari_protodiff.core.progress import CancelToken

    token = CancelToken()
    gen = train_diffusion(two_proto_store, tmp_path / "m", DiffusionConfig.from_preset(
        "tiny", autoencoder={"steps": 20}, checkpoint_every=10), cancel=token)
    with pytest.raises(Cancelled):
        for ev in gen:
            if ev.step >= 10:
                token.cancel()
    assert not (tmp_path / "m" / "protodiff.json").exists()
    assert (tmp_path / "m" / "training" / "ckpt-vae" / "latest.json").exists()
    with pytest.raises(ModelError, match="incomplete"):
        load_bundle(tmp_path / "m")
