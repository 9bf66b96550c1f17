"""protodiff study on a tiny config: a random-initialised ViT and the built-in encoder on a MIL and a probe task."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from napari_protodiff.cli import main
from napari_protodiff.core.store import PatchStore


def test_study_cli_tiny(tmp_path, eval_store, eval_slides, capsys):
    (tmp_path / "cohort.csv").write_text(
        "slide,patient,label\n" + "\n".join(f"{s},p{i},{'ab'[i % 2]}" for i, s in enumerate(eval_slides)) + "\n")
    st = PatchStore(eval_store)
    for cls, sid in (("cmu", "CMU-1-Small-Region"), ("tia", "tiatoolbox-he-region")):
        (tmp_path / "patches" / cls).mkdir(parents=True)
        for i, p in enumerate(np.asarray(st.slide(sid).patches()[:12].compute())):
            Image.fromarray(p).save(tmp_path / "patches" / cls / f"{i}.png")
    config = {
        "real": [str(eval_store)],
        "arms": ["random"],
        "pretrain": {"preset": "tiny"},
        "encoders": {"builtin": "builtin"},
        "tasks": [{"name": "subtype", "kind": "mil", "cohort": "cohort.csv", "store": str(eval_store), "folds": 2,
                   "epochs": 2},
                  {"name": "tissue", "kind": "probe", "patches": "patches", "folds": 3}],
        "reference": "builtin",
        "n_boot": 50,
        "device": "cpu",
    }
    (tmp_path / "study.json").write_text(json.dumps(config))
    rc = main(["study", str(tmp_path / "study.json"), "-o", str(tmp_path / "run"), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(out.out)
    encs = {r["encoder"] for r in d["table"]}
    tasks = {r["task"] for r in d["table"]}
    assert encs == {"random", "builtin"} and tasks == {"subtype", "tissue:linear", "tissue:knn"}
    report = (tmp_path / "run" / "outputs" / "report.md").read_text()
    assert "builtin (reference)" in report and "plots/subtype_auc.png" in report
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"


def test_study_config_errors(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps({"arms": ["real"], "tasks": [{"name": "t", "kind": "mil"}]}))
    rc = main(["study", str(tmp_path / "s.json"), "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "needs cohort and store" in err and not (tmp_path / "run").exists()


def test_study_given_synthetic_store_must_be_a_store(tmp_path, eval_store, capsys):
    """An already sampled synthetic store (what protodiff demo hands its study) replaces sampling; a wrong one is
    one sentence, before any training."""
    config = {"real": [str(eval_store)], "arms": ["synthetic"], "synthetic": "nope.zarr",
              "tasks": [{"name": "t", "kind": "probe", "patches": "patches"}]}
    (tmp_path / "s.json").write_text(json.dumps(config))
    rc = main(["study", str(tmp_path / "s.json"), "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.zarr: not a patch store" in err and "\n" not in err.strip()
    assert not (tmp_path / "run" / "diffusion").exists()


def test_demo_study_quick(tmp_path, capsys):
    """protodiff study --demo: the bundled slide, a planted cohort of its patches (and a probe on them),
    random vs built-in encoder."""
    rc = main(["study", "--demo", str(tmp_path / "demo"), "--demo-quick", "-o", str(tmp_path / "run"), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out)["table"]
    auc = {r["encoder"]: r["value"] for r in rows if r["metric"] == "auc" and r["task"] == "planted"}
    assert set(auc) == {"random", "builtin"} and auc["builtin"] > 0.8
    assert {r["task"] for r in rows} == {"planted", "planted-patches:linear", "planted-patches:knn"}
    labels = [np.asarray(e.group["labels"][:]) for e in PatchStore(tmp_path / "demo" / "cohort" / "cohort.zarr").slides()]
    assert {int(v) for lab in labels for v in lab} == {0, 1}
    report = (tmp_path / "run" / "outputs" / "report.md").read_text()
    assert "Smoke-scale demonstration" in report and "not meaningful" in report
