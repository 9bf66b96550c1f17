"""Gated-attention multiple-instance learning (ABMIL, Ilse et al. 2018) and its losses.

A slide is a bag of patch features ``(N, D)``. The model embeds each patch
(``h = ReLU(W x)``), scores it with gated attention
``a = w^T (tanh(V h) * sigmoid(U h))``, pools ``z = sum softmax(a) h`` and predicts
from ``z``. Bags of different sizes are padded into one batch with a mask.

Losses:

- classification: cross-entropy over classes;
- survival, discrete time: the negative log-likelihood of a discrete-time hazard model
  over time bins (Zadeh & Schmid 2020): for a bag whose event or censoring falls in
  bin ``k``, ``-log S(k-1) - log h(k)`` if it had the event and ``-log S(k)`` if censored,
  with ``S(k) = prod_{j<=k} (1 - h(j))``; its risk score is ``-sum_k S(k)``;
- survival, Cox: the negative Cox partial log-likelihood (Breslow ties) of a scalar
  risk over the bags of a batch.
"""

from __future__ import annotations

import numpy as np


def _torch():
    import torch

    return torch


def build_model(in_dim: int, n_out: int, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.1):
    """A :class:`GatedAttentionMIL` module (torch imported lazily)."""
    torch = _torch()
    nn = torch.nn

    class GatedAttentionMIL(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
            self.attn_v = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh())
            self.attn_u = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid())
            self.attn_w = nn.Linear(attn_dim, 1)
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_out))

        def forward(self, x, mask):
            """``x`` (B, N, D), ``mask`` (B, N) bool -> (outputs (B, n_out), attention (B, N))."""
            h = self.embed(x)
            a = self.attn_w(self.attn_v(h) * self.attn_u(h)).squeeze(-1)
            a = a.masked_fill(~mask, float("-inf"))
            w = torch.softmax(a, dim=1)
            z = torch.bmm(w.unsqueeze(1), h).squeeze(1)
            return self.head(z), w

    return GatedAttentionMIL()


def pad_bags(bags: list[np.ndarray], device: str = "cpu"):
    """Stack bags ``(N_i, D)`` into ``(B, max N, D)`` with a ``(B, max N)`` mask."""
    torch = _torch()
    n = max(len(b) for b in bags)
    d = bags[0].shape[1]
    x = np.zeros((len(bags), n, d), np.float32)
    m = np.zeros((len(bags), n), bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        m[i, : len(b)] = True
    return torch.from_numpy(x).to(device), torch.from_numpy(m).to(device)


# -- survival losses -----------------------------------------------------------------------
def time_bins(time: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges: quantiles of the event times (falls back to all times when events are few)."""
    t = np.asarray(time, float)[np.asarray(event, bool)]
    if len(t) < n_bins:
        t = np.asarray(time, float)
    edges = np.unique(np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return edges


def bin_index(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, np.asarray(time, float), side="right")


def discrete_nll(logits, bins, event, eps: float = 1e-7):
    """Mean negative log-likelihood of discrete-time hazards ``sigmoid(logits)`` (B, K)."""
    torch = _torch()
    h = torch.sigmoid(logits).clamp(eps, 1 - eps)
    log_s = torch.cumsum(torch.log1p(-h), dim=1)  # log S(k)
    log_s_prev = torch.cat([torch.zeros_like(log_s[:, :1]), log_s[:, :-1]], dim=1)  # log S(k-1)
    b = bins.long().unsqueeze(1)
    ll_event = log_s_prev.gather(1, b) + torch.log(h.gather(1, b))
    ll_cens = log_s.gather(1, b)
    e = event.float().unsqueeze(1)
    return -(e * ll_event + (1 - e) * ll_cens).mean()


def discrete_risk(logits):
    """Risk score of discrete-time hazards: minus the summed survival function (higher = earlier event)."""
    torch = _torch()
    h = torch.sigmoid(logits)
    return -torch.cumprod(1 - h, dim=1).sum(dim=1)


def cox_loss(risk, time, event):
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events; 0 without events."""
    torch = _torch()
    r = risk.reshape(-1)
    order = torch.argsort(time, descending=True)
    r, e = r[order], event[order].float()
    t = time[order]
    log_cum = torch.logcumsumexp(r, dim=0)
    # Breslow: tied times share the risk set of the earliest of them (the last in this order)
    _, inverse, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    log_risk_set = log_cum[last[inverse]]
    n_ev = e.sum()
    if n_ev == 0:
        return (r * 0).sum()
    return -((r - log_risk_set) * e).sum() / n_ev
