"""The whole study on a tiny config: prototypes, diffusion, guided and unguided sampling, five DINO arms, evaluation.

About 7 minutes on two shared CPU cores, so it runs only with PROTODIFF_FULL_STUDY=1
(the fast tests cover each stage's own code; this one covers their hand-offs).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from napari_protodiff.core.evaluation.study import ARMS, load_study_config, run_study
from napari_protodiff.core.progress import drain

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("PROTODIFF_FULL_STUDY"), reason="set PROTODIFF_FULL_STUDY=1")]


def test_full_study_tiny(tmp_path, eval_store, eval_slides):
    shutil.copytree(eval_store, tmp_path / "real.zarr")
    (tmp_path / "cohort.csv").write_text("slide,patient,label\n" + "\n".join(
        f"{s},p{i},{'ab'[i % 2]}" for i, s in enumerate(eval_slides)) + "\n")
    cfg = {"real": ["real.zarr"], "arms": list(ARMS),
           "diffusion": {"preset": "tiny", "autoencoder": {"steps": 10}, "unet": {"steps": 10},
                         "classifier": {"steps": 10}, "device": "cpu"},
           "n_synthetic": 16, "pretrain": {"preset": "tiny", "epochs": 1, "images_per_epoch": 64, "workers": 0},
           "encoders": {"builtin": "builtin"},
           "tasks": [{"name": "subtype", "kind": "mil", "cohort": "cohort.csv", "store": "real.zarr", "folds": 2,
                      "epochs": 2}],
           "n_boot": 20, "device": "cpu"}
    (tmp_path / "study.json").write_text(json.dumps(cfg))
    rows, report, rd = drain(run_study(load_study_config(tmp_path / "study.json"), tmp_path / "run"))
    assert {r["encoder"] for r in rows} == set(ARMS) | {"builtin"}
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert {"diffusion", "sample:synthetic.zarr", "sample:synthetic-unguided.zarr"} <= set(stages)
    assert "real (reference)" in report.read_text() and rd.state == "finished"
