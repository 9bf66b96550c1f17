"""Screenshot of the Slides widget docked over the sample slide with its preview layers.

Run under a display (or Xvfb)::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1200x24" \
        .venv/bin/python scripts/screenshot_slides_widget.py [docs/images/slides_widget.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

from _screenshot import save_window, wait_until_idle


def main(out: str = "docs/images/slides_widget.png") -> Path:
    import napari

    from napari_protodiff._napari.slides_widget import SlidesWidget
    from napari_protodiff.data import SAMPLE_SLIDE

    viewer = napari.Viewer(show=True, title="napari-protodiff: Slides")
    viewer.window._qt_window.resize(1500, 1000)
    _, widget = viewer.window.add_plugin_dock_widget("napari-protodiff", "Slides")
    assert isinstance(widget, SlidesWidget)
    widget.open_path(SAMPLE_SLIDE)
    widget.store_edit.setText("patches.zarr")
    widget.preview()
    wait_until_idle(widget)
    return save_window(viewer, out, settle_first=50)


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
