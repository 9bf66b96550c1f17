"""The Jobs widget with pretraining: a subprocess watched live, cancelled, resumed; errors; a responsive viewer.

(Evaluations and studies from the same widget: tests/gui/test_evaluation_widget.py.)"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.gui
pytest.importorskip("lightly")

WAIT = 600_000  # ms: a subprocess that imports torch and trains, on a CPU shared with other jobs


@pytest.fixture(scope="module")
def store(tmp_path_factory, cmu_svs):
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    out = tmp_path_factory.mktemp("jobs") / "real.zarr"
    drain(tile_slides([cmu_svs], out, TilingConfig(size=32, mpp=1.0)))
    return out


@pytest.fixture
def jobs_widget(make_napari_viewer, qtbot):
    from napari_protodiff._napari.jobs_widget import JobsWidget

    viewer = make_napari_viewer()
    widget = JobsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Jobs")
    yield widget
    if widget.busy:
        widget.job.kill()
        qtbot.waitUntil(lambda: not widget.busy, timeout=30_000)


def _fill(w, store, run, epochs=1, images=8):
    f = w.form_for("pretrain")
    f.real_edit.setText(str(store))
    w.run_edit.setText(str(run))
    f.epochs.setValue(epochs)
    f.batch.setValue(4)
    f.images.setValue(images)
    f.workers.setValue(1)


def _ticking():
    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    cpu: list[float] = []  # CPU time of the GUI thread at each tick
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: (ticks.append(time.perf_counter()), cpu.append(time.thread_time())))
    timer.start()
    return timer, ticks, cpu


def test_the_plugin_menu_docks_the_widget(make_napari_viewer):
    from napari_protodiff._napari.jobs_widget import JobsWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-protodiff", "Jobs")
    assert isinstance(widget, JobsWidget)


def test_runs_pretraining_live_and_the_viewer_stays_responsive(jobs_widget, store, tmp_path, qtbot, monkeypatch):
    w = jobs_widget
    _fill(w, store, tmp_path / "run", epochs=1)
    cmd = w.command()
    assert cmd[:3] == ["pretrain", "-o", str(tmp_path / "run")] and "--real" in cmd
    timer, ticks, cpu = _ticking()
    assert w.start()
    assert w.busy and not w.start_button.isEnabled() and w.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    timer.stop()
    gaps = np.diff(ticks)
    cpu_gaps = np.diff(cpu)
    print(f"event loop during the pretraining job: {len(ticks)} ticks of 10 ms over {ticks[-1] - ticks[0]:.1f} s, "
          f"max gap {gaps.max() * 1000:.1f} ms, median {np.median(gaps) * 1000:.1f} ms, "
          f"99th percentile {np.percentile(gaps, 99) * 1000:.1f} ms; GUI-thread CPU time between ticks max "
          f"{cpu_gaps.max() * 1000:.1f} ms")
    assert "finished" in w.status_label.text().lower(), w.status_label.text()
    assert w.progress_bar.value() == w.progress_bar.maximum()
    assert len(w.plot.values) == 2 and w.plot.steps == [1, 2]
    assert len(ticks) > 100
    assert cpu_gaps.max() < 0.1  # what the GUI thread itself computes between two ticks

    opened = []
    from qtpy.QtGui import QDesktopServices

    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url.toLocalFile()))
    assert w.open_outputs() == tmp_path / "run" / "outputs"
    assert opened == [str(tmp_path / "run" / "outputs")]
    assert (tmp_path / "run" / "outputs" / "encoder" / "model.safetensors").is_file()
    # the runs list shows it, and its summary opens as the results table
    assert [r[:4] for r in w.run_rows()] == [["run", "pretrain", "finished", "2/2"]]
    assert w.results.n_rows > 0 and any(w.results.cell(i, 0) == "last_loss" for i in range(w.results.n_rows))
    # last, so that everything above is checked even where the machine is too busy for this target
    assert gaps.max() < 0.1


def test_cancel_then_resume(jobs_widget, store, tmp_path, qtbot):
    """Also: the cancelled job's kill timer (60 s) must not kill the resumed job started before it fires."""
    from napari_protodiff.core.jobs import RunDir

    w = jobs_widget
    _fill(w, store, tmp_path / "run", epochs=20)  # 40 steps: cancelled long before the end
    assert w.start()
    qtbot.waitUntil(lambda: len(w.plot.values) >= 1 or not w.busy, timeout=WAIT)
    assert w.busy, w.status_label.text()
    w.cancel()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    rd = RunDir.open(tmp_path / "run")
    assert rd.state == "cancelled" and (rd.checkpoints / "last.pt").is_file()
    assert w.run_rows()[0][2] == "cancelled"
    done = rd.status["step"]
    assert 1 <= done < 40 and "cancelled" in w.status_label.text().lower()
    assert w.resume_button.isEnabled()

    assert w.resume()
    qtbot.waitUntil(lambda: (len(w.plot.values) > 0 and w.plot.steps[-1] > done) or not w.busy, timeout=WAIT)
    assert w.busy, w.status_label.text()
    w.cancel()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    assert rd.state == "cancelled" and rd.status["step"] > done
    assert [m["step"] for m in rd.metrics()] == list(range(1, rd.status["step"] + 1))


def test_errors_are_notifications_and_leave_no_run(jobs_widget, store, tmp_path, qtbot, notes):
    w = jobs_widget
    assert not w.start()  # nothing filled in
    assert any("ERROR" in s and "patch store" in m for s, m in notes())
    _fill(w, store, tmp_path / "bad")
    w.form_for("pretrain").fraction.setValue(0.5)  # but no synthetic store
    assert w.start()
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT)
    assert any("ERROR" in s and "no synthetic store is given" in m for s, m in notes())
    assert not (tmp_path / "bad").exists()
