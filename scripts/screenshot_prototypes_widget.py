"""Screenshot of the Prototypes widget: the sample slide's prototype map, legend and an exemplar gallery.

Tiles the bundled sample into a temporary store, embeds it with the built-in encoder and
fits prototypes through the widget. Run under a display (or Xvfb)::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1200x24" \
        .venv/bin/python scripts/screenshot_prototypes_widget.py [docs/images/prototypes_widget.png]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def _settle(app, n: int = 30) -> None:
    for _ in range(n):
        app.processEvents()
        time.sleep(0.01)


def main(out: str = "docs/images/prototypes_widget.png") -> Path:
    import napari
    from qtpy.QtWidgets import QApplication

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
    app = QApplication.instance()
    while widget.busy:
        app.processEvents()
        time.sleep(0.01)
    _settle(app)
    widget.legend.selectRow(2)
    _settle(app)
    viewer.reset_view()
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # the job's "done" toast would hide the scale bar
    _settle(app, 20)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()
    return path


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
