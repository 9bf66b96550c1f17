"""Paired comparisons of two encoders on the same folds, the results table and the Markdown report."""

from __future__ import annotations

import dataclasses

import numpy as np

from napari_protodiff.core.evaluation.compare import results_table, table_markdown
from napari_protodiff.core.evaluation.mil import MILConfig, cross_validate
from napari_protodiff.core.evaluation.planted import planted_bags
from napari_protodiff.core.evaluation.report import write_report
from napari_protodiff.core.progress import drain


def test_table_and_report(tmp_path, real_features):
    x, _c, _s, proto, planted = real_features
    cfg = MILConfig(task="classification", epochs=10, folds=4, batch_bags=32, n_boot=100, device="cpu")
    bags = planted_bags(x, proto, planted, n_patients=40, seed=3)
    rng = np.random.default_rng(0)
    noisy = [dataclasses.replace(b, features=b.features + rng.normal(0, 30 * x.std(0), b.features.shape).astype(np.float32))
             for b in bags]
    sbags = planted_bags(x, proto, planted, task="survival", n_patients=40, seed=3)
    scfg = cfg.model_copy(update={"task": "survival", "loss": "cox"})
    results = {
        "real": {"planted": drain(cross_validate(bags, cfg)), "survival": drain(cross_validate(sbags, scfg))},
        "noisy": {"planted": drain(cross_validate(noisy, cfg))},
    }
    rows = results_table(results, reference="real", n_boot=300, n_perm=200)
    auc = {r["encoder"]: r for r in rows if r["task"] == "planted" and r["metric"] == "auc"}
    assert auc["real"]["best"] and not auc["noisy"]["best"]
    v = auc["noisy"]["vs_reference"]
    assert v["verdict"] == "loses" and v["diff"] < 0 and v["p_value"] < 0.05 and v["high"] < 0
    md = table_markdown(rows)
    assert "▼" in md and "real (reference)" in md
    report = write_report(tmp_path, rows, results, reference="real", sizes={"real": 1000, "noisy": 100})
    text = report.read_text()
    assert "| encoder |" in text and "plots/planted_auc.png" in text and "plots/survival_km_real.png" in text
    for f in ("planted_auc.png", "planted_roc.png", "survival_c_index.png", "survival_km_real.png", "data_size.png"):
        assert (tmp_path / "plots" / f).stat().st_size > 1000
    assert (tmp_path / "table.csv").read_text().count("\n") == len(rows) + 1
