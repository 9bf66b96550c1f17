"""ABMIL on cohorts with a planted signal built from real patches (and with the signal removed)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_protodiff.core.evaluation.mil import MILConfig, cross_validate
from napari_protodiff.core.evaluation.planted import attention_concentration, planted_bags
from napari_protodiff.core.progress import drain

FAST = dict(epochs=20, folds=4, batch_bags=32, n_boot=200, device="cpu")


def _run(real_features, task, loss="nll", signal=True, seed=1):
    x, _coords, _sid, proto, planted = real_features
    bags = planted_bags(x, proto, planted, task=task, signal=signal, seed=seed)
    res = drain(cross_validate(bags, MILConfig(task=task, loss=loss, **FAST)))
    return bags, res


def test_planted_classification_auc_and_attention(real_features):
    bags, res = _run(real_features, "classification")
    auc = res.metrics["auc"]
    assert auc.value > 0.9 and auc.low > 0.8, auc
    assert res.metrics["balanced_accuracy"].value > 0.85
    # patients never straddle folds
    by_patient = {}
    for p, f in zip(res.patients, res.fold):
        assert by_patient.setdefault(p, f) == f
    mass, share = attention_concentration(bags, res.attention)
    assert mass > 2 * share and mass > 0.5, (mass, share)
    for b, a in zip(bags, res.attention):
        assert a.shape == (len(b.features),) and a.sum() == pytest.approx(1, abs=1e-4)


def test_classification_without_signal_is_chance(real_features):
    _bags, res = _run(real_features, "classification", signal=False)
    auc = res.metrics["auc"]
    assert abs(auc.value - 0.5) < 0.12 and auc.low < 0.5 < auc.high, auc


@pytest.mark.parametrize("loss", ["nll", "cox"])
def test_planted_survival_c_index(real_features, loss):
    bags, res = _run(real_features, "survival", loss=loss)
    ci = res.metrics["c_index"]
    assert ci.value > 0.7 and ci.low > 0.6, ci
    assert res.logrank["p_value"] < 0.01
    mass, share = attention_concentration(bags, res.attention)
    assert mass > 1.5 * share, (mass, share)


def test_survival_without_signal_is_chance(real_features):
    _bags, res = _run(real_features, "survival", loss="cox", signal=False, seed=2)
    ci = res.metrics["c_index"]
    assert abs(ci.value - 0.5) < 0.1 and ci.low < 0.5 < ci.high, ci
