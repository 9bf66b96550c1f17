"""What the widget screenshot scripts share: wait for a widget's job, let the window settle,
fit the view, close toasts, and save the whole window."""

from __future__ import annotations

import time
from pathlib import Path


def settle(n: int = 30) -> None:
    """Process Qt events for about ``n`` x 10 ms."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    for _ in range(n):
        app.processEvents()
        time.sleep(0.01)


def wait_until_idle(widget) -> None:
    """Process Qt events until ``widget.busy`` is false (its background job has finished)."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    while widget.busy:
        app.processEvents()
        time.sleep(0.01)


def save_window(viewer, out: str | Path, settle_first: int = 30) -> Path:
    """Settle, fit the view, close notification toasts (they hide the scale bar), save the
    whole window (widgets included) to ``out`` and close the viewer."""
    settle(settle_first)
    viewer.reset_view()
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    settle(20)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()
    return path
