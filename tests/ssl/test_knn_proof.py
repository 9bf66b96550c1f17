"""The measuring instruments of ``benchmarks/pretrain_knn.py`` (the proof that pretraining works).

The proof itself needs minutes of CPU training (see docs/benchmarks.md); these check that
its k-NN classifier and its per-patch stain normalisation do what the benchmark says.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain_knn.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pretrain_knn", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_knn_separates_clusters_and_is_at_chance_on_noise(bench):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    y = rng.integers(0, 4, 400)
    x = centres[y] + rng.normal(size=(400, 16))
    assert bench.knn_accuracy(x[:200], y[:200], x[200:], y[200:]) == 1.0
    noise = rng.normal(size=(400, 16))
    acc = bench.knn_accuracy(noise[:200], y[:200], noise[200:], y[200:])
    assert 0.1 < acc < 0.45  # four balanced classes: chance is 0.25


def test_per_patch_reinhard_removes_colour_statistics_but_keeps_structure(bench):
    from skimage.color import rgb2lab

    rng = np.random.default_rng(1)
    # two "specimens": the same kind of structure (dark blobs on a lighter field) under different stains
    base = rng.random((40, 32, 32)) < 0.3
    pink = np.where(base[..., None], [120, 40, 110], [235, 170, 200])
    purple = np.where(base[..., None], [70, 30, 120], [200, 160, 225])
    x = np.concatenate([pink[:20], purple[20:]]).astype(np.float64)
    x = np.clip(x + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)
    n = bench.reinhard_per_patch(x, x)
    lab = rgb2lab(n)
    means = lab.mean((1, 2))
    assert np.abs(means[:20].mean(0) - means[20:].mean(0)).max() < 2.0  # the stains' mean colour is gone
    raw_means = rgb2lab(x).mean((1, 2))
    assert np.abs(raw_means[:20].mean(0) - raw_means[20:].mean(0)).max() > 10.0
    # the structure stays: the blob mask is still the darker part of every patch
    lum = lab[..., 0]
    assert all(lum[i][base[i]].mean() < lum[i][~base[i]].mean() - 20 for i in range(40))
    # and a colour histogram can no longer tell the two stains apart as well as before
    y = np.repeat([0, 1], 20)
    idx = rng.permutation(40)
    b, q = idx[:20], idx[20:]
    h_raw, h_norm = bench.colour_histogram(x), bench.colour_histogram(n)
    assert bench.knn_accuracy(h_raw[b], y[b], h_raw[q], y[q], k=5) == 1.0
    assert bench.knn_accuracy(h_norm[b], y[b], h_norm[q], y[q], k=5) < 0.9
