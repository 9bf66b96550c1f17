"""Attention maps saved by an evaluation become an image layer aligned with the slide (no display needed)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_protodiff._napari.attention_layer import attention_layer_data
from napari_protodiff.core.evaluation.attention import write_attention
from napari_protodiff.core.evaluation.mil import Bag, MILResult
from napari_protodiff.core.evaluation.metrics import CI


def test_attention_layer_aligned_in_microns(tmp_path):
    fp = 64  # level-0 px per patch
    coords = np.array([[128, 64], [192, 64], [128, 128], [320, 192]], np.int64)
    att = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    bag = Bag("s1", "p1", np.zeros((4, 3), np.float32), coords, label="a",
              meta={"slide_path": "/x/s1.svs", "footprint_level0": fp, "slide_mpp": 0.25})
    res = MILResult("classification", None, ["a", "b"], ["s1"], ["p1"], np.array([0]), np.array([[0.4, 0.6]]), [att],
                    {"auc": CI(1, 1, 1)}, [])
    write_attention(tmp_path / "attention.zarr", [bag], res)
    data, kw, kind = attention_layer_data(tmp_path, "s1.svs", scale=(0.25, 0.25))
    assert kind == "image" and data.shape == (3, 4)
    assert data[0, 0] == pytest.approx(0.4) and data[2, 3] == pytest.approx(1.6) and np.isnan(data[1, 3])
    # pixel (r, c) centre lands on the centre of its patch in µm
    sc, tr = np.array(kw["scale"]), np.array(kw["translate"])
    centre = tr + np.array([2, 3]) * sc
    y, x = 192 + (fp - 1) / 2, 320 + (fp - 1) / 2
    assert centre == pytest.approx(np.array([y, x]) * 0.25)
    assert kw["metadata"]["slide_id"] == "s1"
