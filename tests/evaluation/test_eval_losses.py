"""ABMIL survival losses against reference values: the Cox partial likelihood of lifelines, the discrete-time NLL by hand."""

from __future__ import annotations

import numpy as np
import pytest


def test_cox_loss_fits_lifelines_coefficients():
    import pandas as pd
    import torch
    from lifelines import CoxPHFitter

    from napari_protodiff.core.evaluation.abmil import cox_loss

    rng = np.random.default_rng(0)
    n = 120
    x = rng.normal(size=(n, 2))
    t = rng.exponential(1 / np.exp(x @ np.array([0.8, -0.5])))
    c = rng.exponential(2.0, n)
    e, t = (t <= c).astype(float), np.minimum(t, c)
    ref = CoxPHFitter().fit(pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "t": t, "e": e}), "t", "e").params_.to_numpy()
    beta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    X, T, E = (torch.as_tensor(a) for a in (x, t, e))
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = cox_loss(X @ beta, T, E)
        loss.backward()
        return loss

    opt.step(closure)
    assert beta.detach().numpy() == pytest.approx(ref, abs=1e-4)


def test_discrete_nll_by_hand():
    import torch

    from napari_protodiff.core.evaluation.abmil import discrete_nll, discrete_risk

    logits = torch.tensor([[0.2, -1.0, 0.5], [1.0, 0.0, -0.3]])
    h = torch.sigmoid(logits).numpy()
    # slide 0: event in bin 1; slide 1: censored in bin 2
    ll0 = np.log(1 - h[0, 0]) + np.log(h[0, 1])
    ll1 = np.log(1 - h[1, 0]) + np.log(1 - h[1, 1]) + np.log(1 - h[1, 2])
    got = discrete_nll(logits, torch.tensor([1, 2]), torch.tensor([1.0, 0.0])).item()
    assert got == pytest.approx(-(ll0 + ll1) / 2, rel=1e-5)
    s = np.cumprod(1 - h, axis=1)
    assert discrete_risk(logits).numpy() == pytest.approx(-s.sum(1), rel=1e-5)
