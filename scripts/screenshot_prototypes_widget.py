"""Screenshot of the Prototypes widget: the sample slide's prototype map, legend and an exemplar gallery.

Tiles the bundled sample into a temporary store, embeds it with the built-in encoder and
fits prototypes through the widget. Run under a display (or Xvfb)::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1200x24" \
        .venv/bin/python scripts/screenshot_prototypes_widget.py [docs/images/prototypes_widget.png]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _screenshot import save_window, settle, wait_until_idle


def main(out: str = "docs/images/prototypes_widget.png") -> Path:
    import napari

    from napari_protodiff._napari.prototypes_widget import PrototypesWidget
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides
    from napari_protodiff.data import SAMPLE_SLIDE

    store = Path(tempfile.mkdtemp()) / "patches.zarr"
    drain(tile_slides([SAMPLE_SLIDE], store, TilingConfig(size=64, mpp=0.5)))

    viewer = napari.Viewer(show=True, title="napari-protodiff: Prototypes")
    viewer.window._qt_window.resize(1500, 1050)
    _, widget = viewer.window.add_plugin_dock_widget("napari-protodiff", "Prototypes")
    assert isinstance(widget, PrototypesWidget)
    viewer.open(str(SAMPLE_SLIDE), plugin="napari-protodiff")
    widget.set_store(store)
    widget.proto_form.set_values(k=6, seed=0)
    widget.run()
    wait_until_idle(widget)
    settle()
    widget.legend.selectRow(2)
    return save_window(viewer, out)


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
