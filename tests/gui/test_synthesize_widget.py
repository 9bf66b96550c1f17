"""The Synthesize widget: a real (tiny, barely trained) model sampled in the background into image
layers, progress per step, cancel, metadata, nearest real patches, picks from the prototype map, errors.

The model is trained here with the core API at the smallest settings that run (2 steps per part):
these tests check the widget's plumbing, not the quality of the samples (tests/diffusion does that).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from napari_protodiff.core.diffusion.config import DiffusionConfig, SampleConfig

pytestmark = pytest.mark.gui

WAIT = 120_000  # ms: a CPU shared with other jobs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cmu_svs, ink_jpeg):
    """(real store, model folder): 32-px patches of two specimens, k = 2 prototypes, a model of 2 steps a part."""
    from napari_protodiff.core.diffusion.fit import train_diffusion
    from napari_protodiff.core.diffusion.prototypes_adapter import make_prototypes
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    root = tmp_path_factory.mktemp("synthesize")
    store = root / "real.zarr"
    drain(tile_slides([cmu_svs], store, TilingConfig(size=32, mpp=1.0)))
    drain(tile_slides([ink_jpeg], store, TilingConfig(size=32, mpp=1.0, mpp_override=0.5)))
    make_prototypes(store, k=2, seed=0)
    cfg = DiffusionConfig.from_preset(
        "tiny", seed=0, max_patches=96, device="cpu",
        autoencoder=dict(steps=2, batch_size=8, block_out_channels=(8, 16, 16)),
        unet=dict(steps=2, batch_size=8, block_out_channels=(8, 16)),
        classifier=dict(steps=2, batch_size=8, channels=(8, 16)))
    drain(train_diffusion(store, root / "model", cfg))
    return store, root / "model"


@pytest.fixture(scope="module")
def tiny_cfg(tiny):
    """The same, with a UNet conditioned on the prototype id (classifier-free guidance)."""
    from napari_protodiff.core.diffusion.fit import train_diffusion
    from napari_protodiff.core.progress import drain

    store, model = tiny
    cfg = DiffusionConfig(**json.loads((model / "protodiff.json").read_text())["config"])
    cfg = cfg.model_copy(update={"unet": cfg.unet.model_copy(update={"class_conditional": True})})
    drain(train_diffusion(store, model.parent / "model-cfg", cfg))
    return model.parent / "model-cfg"


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    """The widget docked from the plugin's contribution (with napari's public-only viewer proxy)."""
    from napari_protodiff._napari.synthesize_widget import SynthesizeWidget

    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-protodiff", "Synthesize")
    assert isinstance(w, SynthesizeWidget)
    yield w
    w.cancel()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)


def _run(w, qtbot, **values):
    w.form.set_values(**values)
    w.run()
    assert w.busy and w.cancel_button.isEnabled() and not w.run_button.isEnabled()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)


def _errors(notes):
    return [m for s, m in notes() if "ERROR" in s]


def test_samples_with_metadata_and_the_core_apis_pixels(widget, tiny, qtbot, notes):
    from napari_protodiff.core.diffusion.synthesize import sample_images
    from napari_protodiff.core.progress import drain

    store, model = tiny
    w = widget
    w.set_model(model)
    assert w.proto_table.rowCount() == 2 and w.checked == [0, 1]
    assert "2 prototypes" in w.model_label.text() and w.real_edit.text() == str(store.resolve())
    counts = [int(w.proto_table.item(j, 1).text().replace(",", "")) for j in range(2)]
    assert sum(counts) > 0  # the model's training patches per prototype
    w.set_mode("one")
    _run(w, qtbot, n=4, steps=3, seed=7, guidance=2.0, scheduler="ddpm")
    assert not _errors(notes)
    assert w.last_step == 3 and w.progress_bar.value() == w.progress_bar.maximum()  # a step per denoising step
    [layer] = w.layers
    assert layer in w.viewer.layers and layer.rgb and layer.data.shape == (4, 32, 32, 3)
    md = layer.metadata
    assert md["prototype"] == [0, 1, 0, 1] and md["seed"] == [7, 8, 9, 10] and md["guidance"] == [2.0] * 4
    assert md["scheduler"] == "ddpm" and md["steps"] == 3 and md["cfg_scale"] is None
    assert md["model_hash"].startswith("sha256:") and md["layout"] == "stack"
    mpp = json.loads((model / "protodiff.json").read_text())["patch_mpp"]
    assert mpp == pytest.approx(1.0, abs=0.01) and tuple(layer.scale[1:]) == pytest.approx((mpp, mpp))  # µm/px

    # Same seed, same pixels as the core API (a fresh pipeline from the folder).
    cfg = SampleConfig(**md["sample_config"])
    images, requested = drain(sample_images(str(model), cfg))
    assert np.array_equal(layer.data, images) and requested.tolist() == md["prototype"]

    # Grid layout, one prototype, mixture: the same model (not reloaded), the same patches in the mosaic.
    pipe = w._pipe
    w.layout_combo.setCurrentText("grid")
    _run(w, qtbot, n=4, steps=3, seed=7, guidance=2.0, scheduler="ddpm")
    assert w._pipe is pipe
    [grid] = w.layers
    assert grid.data.shape[-1] == 4 and grid.metadata["layout"] == "grid"
    for i, (y, x) in enumerate(grid.metadata["origin"]):
        assert np.array_equal(grid.data[y:y + 32, x:x + 32, :3], images[i])
        assert (grid.data[y:y + 32, x:x + 32, 3] == 255).all()
    assert (grid.data[:, 32:grid.metadata["origin"][1][1], 3] == 0).all()  # transparent gaps
    w.set_mode("mixture")
    _run(w, qtbot, n=2, steps=2, seed=0, guidance=1.0)
    assert w.layers[0].metadata["prototype"] == [-1, -1] and w.layers[0].metadata["prototypes"] == "0:0.5,1:0.5"
    # Weighted mixture: the table's weights (shown in mixture mode only), normalised; the core API's pixels.
    assert not w.proto_table.isColumnHidden(3)
    w.set_weights({0: 3.0, 1: 1.0})
    w.layout_combo.setCurrentText("stack")
    _run(w, qtbot, n=2, steps=2, seed=0, guidance=1.0)
    md = w.layers[0].metadata
    assert md["prototypes"] == "0:0.75,1:0.25" and md["prototype"] == [-1, -1]
    images, _ = drain(sample_images(str(model), SampleConfig(**md["sample_config"])))
    assert np.array_equal(w.layers[0].data, images)
    w.set_mode("one")
    assert w.proto_table.isColumnHidden(3)
    assert not _errors(notes)


def test_classifier_free_guidance(widget, tiny_cfg, tiny, qtbot, notes):
    from napari_protodiff.core.diffusion.synthesize import sample_images
    from napari_protodiff.core.progress import drain

    w = widget
    w.set_model(tiny[1])
    assert not w.cfg_check.isEnabled()  # a model without prototype ids
    w.set_model(tiny_cfg)
    assert w.cfg_check.isEnabled() and "classifier-free" in w.model_label.text()
    w.cfg_check.setChecked(True)
    w.cfg_spin.setValue(2.5)
    w.set_mode("one")
    w.set_checked([1])
    _run(w, qtbot, n=2, steps=2, seed=5, guidance=0.0)
    assert not _errors(notes)
    [layer] = w.layers
    md = layer.metadata
    assert md["cfg_scale"] == 2.5 and md["prototype"] == [1, 1] and md["guidance"] == [0.0, 0.0]
    images, _ = drain(sample_images(str(tiny_cfg), SampleConfig(**md["sample_config"])))
    assert np.array_equal(layer.data, images)


def test_cancel_stops_sampling_early(widget, tiny, qtbot, notes):
    w = widget
    w.set_model(tiny[1])
    n_layers = len(w.viewer.layers)
    w.form.set_values(n=2, steps=1000, seed=0, guidance=1.0)
    w.run()
    qtbot.waitUntil(lambda: w.last_step >= 1, timeout=WAIT)
    w.cancel()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    assert w.last_outcome.cancelled and w.last_step < 1000
    assert len(w.viewer.layers) == n_layers  # nothing added
    assert any("Cancelled at step" in m for _, m in notes()) and not _errors(notes)
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()


def test_nearest_real_patch_beside_each(widget, tiny, qtbot, notes):
    from napari_protodiff.core.diffusion.fidelity import _cdist, _pixels32
    from napari_protodiff.core.diffusion.prototypes_adapter import store_patches
    from napari_protodiff.core.store import PatchStore

    store, model = tiny
    w = widget
    w.set_model(model)
    w.nearest_check.setChecked(True)
    _run(w, qtbot, n=3, steps=2, seed=3, guidance=1.0)
    assert not _errors(notes)
    synth, real = w.layers
    md = real.metadata
    assert real.data.shape == synth.data.shape == (3, 32, 32, 3)
    assert real.translate[2] - synth.translate[2] == pytest.approx((32 + 4) * synth.scale[2])  # beside, 4-px gap
    pool = store_patches(PatchStore(store))
    d = _cdist(_pixels32(synth.data), _pixels32(pool))
    assert md["index"] == d.argmin(1).tolist()  # the nearest of all real patches
    assert np.allclose(md["distance"], d.min(1), atol=1e-3)
    assert np.array_equal(real.data, pool[md["index"]])
    assert len(md["slide_id"]) == 3 and len(md["coords"]) == 3 and md["near_copy"] == [False] * 3

    # Grid layout: each real patch right of its synthetic one.
    w.layout_combo.setCurrentText("grid")
    _run(w, qtbot, n=3, steps=2, seed=3, guidance=1.0)
    synth, real = w.layers
    assert real.data.shape == synth.data.shape
    for i, (y, x) in enumerate(synth.metadata["origin"]):
        assert np.array_equal(real.data[y:y + 32, x:x + 32, :3], pool[md["index"][i]])
    assert real.translate[1] - synth.translate[1] == pytest.approx(36 * synth.scale[1])

    # The real store is gone: the synthetic patches still come, with a clear warning.
    w.real_edit.setText(str(store.parent / "moved.zarr"))
    before = len(w.viewer.layers)
    _run(w, qtbot, n=2, steps=2, seed=3, guidance=1.0)
    assert len(w.viewer.layers) == before + 1 and len(w.layers) == 1
    assert any("WARNING" in s and "moved.zarr" in m and "not shown" in m for s, m in notes())


def test_a_pick_on_the_prototype_map_ticks_the_prototype(make_napari_viewer, tiny, qtbot):
    from napari_protodiff._napari.prototypes_widget import PrototypesWidget
    from napari_protodiff._napari.synthesize_widget import SynthesizeWidget

    store, model = tiny
    viewer = make_napari_viewer()
    _, protos = viewer.window.add_plugin_dock_widget("napari-protodiff", "Prototypes")
    _, w = viewer.window.add_plugin_dock_widget("napari-protodiff", "Synthesize")
    assert isinstance(protos, PrototypesWidget) and isinstance(w, SynthesizeWidget)
    w.set_model(model)
    w.set_mode("balanced")
    protos.set_store(store)
    assert protos.show_prototypes() is not None
    protos.pick(1)
    assert w.checked == [1] and w.mode == "one" and "Prototype 1 picked" in w.status_label.text()
    protos.legend.selectRow(0)  # the user picks in the legend
    assert w.checked == [0]


def test_bad_input_is_one_sentence_and_no_layer(widget, tiny, qtbot, tmp_path, notes):
    store, model = tiny
    w = widget
    n_layers = len(w.viewer.layers)

    w.set_model(tmp_path / "nowhere")
    assert "no such model folder" in w.model_label.text()
    w.run()
    assert not w.busy and _errors(notes)[-1].endswith("no such model folder.")

    broken = shutil.copytree(model, tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    w.set_model(broken)
    _run(w, qtbot, n=2, steps=2)
    msg = _errors(notes)[-1]
    assert "has no 'unet' part" in msg and "\n" not in msg

    w.set_model(model)
    w.set_mode("one")
    w.set_checked([])
    w.run()
    assert not w.busy and _errors(notes)[-1] == "Tick at least one prototype (or choose the balanced mode)."

    w.set_mode("mixture")
    w.set_checked([0, 1])
    w.set_weights({0: 0.0, 1: 0.0})
    w.run()
    assert not w.busy and _errors(notes)[-1] == ("The mixture's weights are all zero: give at least one ticked "
                                                 "prototype a weight.")
    w.set_weights({0: 1.0, 1: 1.0})
    w.cfg_check.setEnabled(True)  # a model without --cfg: the core refuses classifier-free guidance
    w.cfg_check.setChecked(True)
    _run(w, qtbot, n=2, steps=2)
    assert "classifier-free guidance" in _errors(notes)[-1]
    assert len(w.viewer.layers) == n_layers and w.status_label.text() == _errors(notes)[-1]


@pytest.mark.slow
def test_diffusers_imports_after_a_software_gl_viewer(tmp_path):
    """Under Mesa's software OpenGL (libLLVM in the process, as here under Xvfb) importing diffusers
    after the viewer exists pulled in triton, whose own LLVM clashes with Mesa's: a segmentation fault.
    core.llvm_guard keeps triton out then; this runs the real sequence in a fresh process."""
    import subprocess
    import sys

    # The core's diffusion package is imported before the viewer (as a test fixture or a script does) and
    # diffusers only after it: the guard decides when triton is imported, not when it is installed.
    code = ("import napari_protodiff.core.diffusion.config\n"
            "import napari; v = napari.Viewer(show=False)\n"
            "from napari_protodiff.core.llvm_guard import llvm_loaded\n"
            "import diffusers.models.autoencoders, torch, sys\n"
            "print('ok', llvm_loaded(), 'triton' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
