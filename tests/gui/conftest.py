"""Fixtures for the napari tests: a viewer with the Slides widget docked, and notifications."""

from __future__ import annotations

import pytest


@pytest.fixture
def notes():
    """A function returning the napari notifications (severity, message) dispatched since the test began."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    def since() -> list[tuple[str, str]]:
        return [(str(n.severity).upper(), str(n.message)) for n in notification_manager.records[start:]]

    return since


@pytest.fixture
def slides_widget(make_napari_viewer, qtbot):
    """The Slides widget docked from the Plugins menu's contribution (so it gets napari's
    public-only viewer proxy, as for a user); waits for its jobs before the viewer closes."""
    from napari_protodiff._napari.slides_widget import SlidesWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-protodiff", "Slides")
    assert isinstance(widget, SlidesWidget)
    yield widget
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
