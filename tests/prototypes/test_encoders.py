"""Encoders: the built-in stain/texture encoder, timm models from local files, the registry."""

from __future__ import annotations

import numpy as np
import pytest

from napari_protodiff.core.encoders import EncoderError, load_encoder, resolve_device
from napari_protodiff.core.encoders.builtin import DIM, BuiltinEncoder, feature_names
from napari_protodiff.core.store import PatchStore


@pytest.fixture(scope="module")
def real_patches(two_specimen_store):
    st = PatchStore(two_specimen_store)
    return np.concatenate([e.patches()[:24].compute() for e in st.slides()])


def test_builtin_is_deterministic_batch_invariant_and_bounded(real_patches):
    enc = load_encoder(None)
    assert isinstance(enc, BuiltinEncoder) and enc.dim == DIM == len(feature_names())
    a = enc.encode(real_patches)
    b = np.concatenate([enc.encode(real_patches[i:i + 5]) for i in range(0, len(real_patches), 5)])
    assert a.shape == (len(real_patches), DIM) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1.5
    assert enc.identity()["kind"] == "builtin" and enc.key == "builtin"


def test_builtin_stain_means_match_skimage(real_patches):
    from skimage.color import rgb2hed

    f = BuiltinEncoder().encode(real_patches[:4])
    hed = rgb2hed(real_patches[:4]).reshape(4, -1, 3)
    names = feature_names()
    for s, ch in (("h", 0), ("e", 1), ("d", 2)):
        assert np.allclose(f[:, names.index(f"{s}_mean")] / 4.0, hed[:, :, ch].mean(1), atol=1e-5)


def test_builtin_works_at_any_patch_size():
    rng = np.random.default_rng(0)
    for s in (8, 48, 130):
        out = BuiltinEncoder().encode(rng.integers(0, 256, (3, s, s, 3), dtype=np.uint8))
        assert out.shape == (3, DIM) and np.isfinite(out).all()


def test_timm_from_safetensors_matches_the_model(tiny_vit_file, real_patches):
    import timm
    import torch
    import torch.nn.functional as F

    enc = load_encoder(str(tiny_vit_file), arch="vit_tiny_patch16_224", input_size=32, device="cpu")
    assert enc.dim == 192 and enc.input_size == 32 and enc.kind == "timm"
    assert len(enc.identity()["weights_sha256"]) == 64 and enc.key.startswith("vit_tiny_patch16_224-")
    out = enc.encode(real_patches[:6])
    torch.manual_seed(0)
    ref_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    x = torch.from_numpy(real_patches[:6]).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        ref = ref_model((x - 0.5) / 0.5).numpy()
    assert np.allclose(out, ref, atol=1e-5)
    again = load_encoder(str(tiny_vit_file), arch="vit_tiny_patch16_224", input_size=32, device="cpu")
    assert np.array_equal(again.encode(real_patches[:6]), out)


def test_timm_torch_file_with_dino_wrapper(tiny_vit_file, tmp_path, real_patches):
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(tiny_vit_file))
    ckpt = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(4, 4)}, "epoch": 3}
    p = tmp_path / "dino.pth"
    torch.save(ckpt, p)
    enc = load_encoder(str(p), arch="vit_tiny_patch16_224", input_size=32, device="cpu")
    ref = load_encoder(str(tiny_vit_file), arch="vit_tiny_patch16_224", input_size=32, device="cpu")
    assert np.array_equal(enc.encode(real_patches[:3]), ref.encode(real_patches[:3]))
    assert enc.extra["dropped_keys"] == ["head.mlp.0.weight"]


@pytest.mark.parametrize(
    "arch,size,match",
    [
        ("vit_small_patch16_224", 32, r"vit_tiny\.safetensors: does not fit the architecture: 'cls_token' has shape"),
        ("vit_tiny_patch16_224", None, r"'pos_embed' has shape .*--input-size"),
        ("resnet18", None, r"does not fit the architecture: it lacks 'conv1.weight'"),
    ],
)
def test_mismatched_weights_give_one_clear_sentence(tiny_vit_file, arch, size, match):
    kw = {"input_size": size} if size else {}
    with pytest.raises(EncoderError, match=match) as info:
        load_encoder(str(tiny_vit_file), arch=arch, device="cpu", **kw)
    assert "\n" not in str(info.value)


def test_unreadable_or_unknown_encoders(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="weights.pt: cannot be read as a torch weights file"):
        load_encoder(str(bad), arch="vit_tiny_patch16_224")
    bad_st = tmp_path / "weights.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(EncoderError, match="cannot be read as a safetensors"):
        load_encoder(str(bad_st), arch="vit_tiny_patch16_224")
    with pytest.raises(EncoderError, match="name its timm architecture"):
        load_encoder(str(bad_st))
    with pytest.raises(EncoderError, match="Unknown encoder 'no-such-encoder'"):
        load_encoder("no-such-encoder")
    with pytest.raises(EncoderError, match="needs its weights"):
        load_encoder("uni")
    with pytest.raises(EncoderError, match="Unknown timm architecture"):
        load_encoder(str(bad_st), arch="not_a_model")


def test_exported_dino_encoder_folder_loads(tmp_path, real_patches):
    import timm

    from napari_protodiff.core.ssl.export import export_encoder

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                              dynamic_img_size=True).eval()
    cfg = {"library": "timm", "architecture": "vit_tiny_patch16_224", "arch": "vit_tiny",
           "model_args": {"img_size": 32, "num_classes": 0, "dynamic_img_size": True}, "embed_dim": 192,
           "input_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "patch_mpp": 1.0}
    folder = export_encoder(model, tmp_path / "encoder", cfg)
    enc = load_encoder(str(folder), device="cpu")
    assert enc.mpp == 1.0 and enc.input_size == 32 and enc.dim == 192
    assert enc.encode(real_patches[:2]).shape == (2, 192)


def test_hf_vit_names_are_converted(tiny_vit_file):
    import torch
    from safetensors.torch import load_file

    from napari_protodiff.core.encoders.timm_encoder import hf_vit_to_timm

    sd = load_file(str(tiny_vit_file))
    hf = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
          "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b, p = f"blocks.{i}.", f"encoder.layer.{i}."
        for t in ("weight", "bias"):
            q, k, v = torch.chunk(sd[b + f"attn.qkv.{t}"], 3)
            hf.update({p + f"attention.attention.query.{t}": q, p + f"attention.attention.key.{t}": k,
                       p + f"attention.attention.value.{t}": v, p + f"attention.output.dense.{t}": sd[b + f"attn.proj.{t}"],
                       p + f"layernorm_before.{t}": sd[b + f"norm1.{t}"], p + f"layernorm_after.{t}": sd[b + f"norm2.{t}"],
                       p + f"intermediate.dense.{t}": sd[b + f"mlp.fc1.{t}"], p + f"output.dense.{t}": sd[b + f"mlp.fc2.{t}"]})
        i += 1
    back = hf_vit_to_timm(hf)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_devices():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(EncoderError, match="Unknown device"):
        resolve_device("tpu")
