"""Cohort CSVs (bad input, one sentence each), protodiff evaluate mil end to end on real slides, attention maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_protodiff.cli import main
from napari_protodiff.core.evaluation.errors import EvaluationError
from napari_protodiff.core.evaluation.mil import Bag, check_bags


def _cohort(tmp_path: Path, slides, text: str) -> Path:
    p = tmp_path / "cohort.csv"
    p.write_text(text.format(*slides))
    return p


def _run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


GOOD = "slide,patient,label,time,event\n{0},p1,a,5,1\n{1},p2,b,9,0\n{2},p3,b,3,1\n{3},p4,a,7,1\n"


def test_evaluate_mil_end_to_end(tmp_path, eval_store, eval_slides, capsys):
    cohort = _cohort(tmp_path, eval_slides, GOOD)
    out = tmp_path / "run"
    rc, stdout, err = _run(["evaluate", "mil", "--cohort", str(cohort), "--store", str(eval_store), "-o", str(out),
                            "--encoder", "builtin", "--device", "cpu", "--folds", "2", "--epochs", "3",
                            "--n-boot", "50", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(stdout)
    assert d["task"] == "classification" and d["n_slides"] == 4 and set(d["metrics"]) == {"auc", "balanced_accuracy", "f1_macro"}
    o = out / "outputs"
    assert (o / "results.json").is_file() and (o / "predictions.csv").is_file() and (o / "roc.png").is_file()
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    from napari_protodiff.core.evaluation.attention import attention_grid, read_attention

    maps = read_attention(out, slide=str(eval_slides[0]))
    assert len(maps) == 1 and maps[0].slide_id == "CMU-1-Small-Region"
    grid, origin = attention_grid(maps[0])
    assert np.isfinite(grid).sum() == len(maps[0].attention)
    assert np.nansum(grid) == pytest.approx(len(maps[0].attention), rel=1e-4)
    # survival on the same cohort, Cox loss
    rc, stdout, err = _run(["evaluate", "mil", "--cohort", str(cohort), "--store", str(eval_store), "-o", str(tmp_path / "s"),
                            "--device", "cpu", "--task", "survival", "--loss", "cox", "--folds", "2", "--epochs", "2",
                            "--n-boot", "20", "--json"], capsys)
    assert rc == 0, err
    assert "c_index" in json.loads(stdout)["metrics"] and (tmp_path / "s" / "outputs" / "km.png").is_file()


@pytest.mark.parametrize("text, message", [
    ("slide,label\n{0},a\n", "missing column(s) patient"),
    ("slide,patient,time\n{0},p1,3\n", "needs label, or time and event (it has time but not event)"),
    ("slide,patient,label\n{0},p1,a\nnope.svs,p2,b\n", "slide 'nope.svs' (line 3) is not in the patch store"),
    ("slide,patient,label,fold\n{0},p1,a,0\n{1},p1,a,1\n{2},p2,b,0\n", "patient 'p1' is in fold 0 (line 2) and fold 1"),
    ("slide,patient,time,event\n{0},p1,-2,1\n", "line 2 has a negative time (-2)"),
    ("slide,patient,time,event\n{0},p1,2,yes\n", "line 2 has event 'yes', which is not a number"),
    ("slide,patient,label\n{0},p1,a\n{0},p2,b\n", "is listed twice (lines 2 and 3)"),
])
def test_bad_cohorts_one_sentence(tmp_path, eval_store, eval_slides, capsys, text, message):
    cohort = _cohort(tmp_path, eval_slides, text)
    rc, _out, err = _run(["evaluate", "mil", "--cohort", str(cohort), "--store", str(eval_store),
                          "-o", str(tmp_path / "run"), "--device", "cpu", "--epochs", "1", "--folds", "2"], capsys)
    assert rc == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    results = tmp_path / "run" / "outputs" / "results.json"
    assert not results.exists()
    status = tmp_path / "run" / "status.json"
    if status.exists():
        assert json.loads(status.read_text())["state"] == "failed"


def test_one_class_all_censored_nan_features():
    x = np.ones((5, 3), np.float32)
    two = [Bag("s1", "p1", x, label="a", time=3, event=0), Bag("s2", "p2", x, label="a", time=4, event=0)]
    with pytest.raises(EvaluationError, match="every slide has the label 'a'"):
        check_bags(two, "classification", 2)
    with pytest.raises(EvaluationError, match="every slide is censored"):
        check_bags(two, "survival", 2)
    bad = [Bag("s1", "p1", x, label="a"), Bag("s2", "p2", np.full((4, 3), np.nan, np.float32), label="b")]
    with pytest.raises(EvaluationError, match="features of slide 's2' contain NaN"):
        check_bags(bad, "classification", 2)


def test_probe_cli_reports_bad_patch_csv(tmp_path, capsys):
    p = tmp_path / "patches.csv"
    p.write_text("file,label\nx.png,a\n")
    rc, _out, err = _run(["evaluate", "probe", "--patches", str(p), "--json"], capsys)
    assert rc == 2 and "missing column(s) path" in err


def test_planted_cohort_on_disk_end_to_end(tmp_path, eval_store, capsys):
    """A planted cohort written as a store + CSV: protodiff evaluate mil finds the signal and its attention."""
    from napari_protodiff.core.evaluation.attention import read_attention
    from napari_protodiff.core.evaluation.planted import write_planted_cohort

    csv, store, bags = write_planted_cohort(eval_store, tmp_path / "c", n_patients=16, bag_size=16, seed=1)
    rc, stdout, err = _run(["evaluate", "mil", "--cohort", str(csv), "--store", str(store), "-o", str(tmp_path / "run"),
                            "--device", "cpu", "--folds", "4", "--epochs", "20", "--n-boot", "100", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["metrics"]["auc"]["value"] > 0.9
    maps = {m.slide_id: m for m in read_attention(tmp_path / "run")}
    pos = [b for b in bags if b.meta["planted"].any()]
    mass = np.mean([maps[b.slide_id].attention[b.meta["planted"]].sum() for b in pos])
    share = np.mean([b.meta["planted"].mean() for b in pos])
    assert mass > 1.5 * share
