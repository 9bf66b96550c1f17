"""Training one ABMIL model on one fold's bags, and predicting with it.

Features are standardised with the training patches' mean and standard deviation.
Each epoch visits the training bags in shuffled mini-batches of ``batch_bags`` (the
Cox risk set of a step); a bag larger than ``max_patches`` contributes a random
subset of its patches per step. Deterministic for a given seed on one machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..progress import CancelToken
from .abmil import bin_index, build_model, cox_loss, discrete_nll, discrete_risk, pad_bags, time_bins


@dataclass
class FoldAux:
    mean: np.ndarray
    std: np.ndarray
    edges: np.ndarray | None
    device: str


def _device(name: str) -> str:
    if name == "auto":
        from ..encoders import resolve_device

        return resolve_device("auto")
    return name


def train_fold(bags, task: str, cfg, y=None, time=None, event=None, n_classes: int = 0, seed: int = 0,
               cancel: CancelToken | None = None):
    """Train one model on ``bags``; returns (model, :class:`FoldAux`)."""
    import torch

    device = _device(cfg.device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    allx = np.concatenate([b.features for b in bags])
    mean, std = allx.mean(0), allx.std(0) + 1e-6
    feats = [((b.features - mean) / std).astype(np.float32) for b in bags]
    edges = None
    if task == "classification":
        n_out = n_classes
        target = torch.as_tensor(y, dtype=torch.long)
    elif cfg.loss == "nll":
        edges = time_bins(time, event, cfg.n_bins)
        n_out = len(edges) + 1
        target = torch.as_tensor(bin_index(time, edges), dtype=torch.long)
    else:
        n_out = 1
        target = None
    t_time = None if time is None else torch.as_tensor(time, dtype=torch.float32)
    t_event = None if event is None else torch.as_tensor(event, dtype=torch.float32)
    model = build_model(feats[0].shape[1], n_out, cfg.hidden, cfg.attn_dim, cfg.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if task == "classification":
        counts = np.bincount(y, minlength=n_classes).astype(float)
        weight = torch.as_tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    n = len(bags)
    model.train()
    for _epoch in range(cfg.epochs):
        if cancel is not None:
            cancel.raise_if_cancelled()
        order = rng.permutation(n)
        for s in range(0, n, cfg.batch_bags):
            idx = order[s:s + cfg.batch_bags]
            if task == "survival" and cfg.loss == "cox" and (len(idx) < 2 or event[idx].sum() == 0):
                continue
            batch = []
            for i in idx:
                f = feats[i]
                if len(f) > cfg.max_patches:
                    f = f[rng.choice(len(f), cfg.max_patches, replace=False)]
                batch.append(f)
            x, m = pad_bags(batch, device)
            out, _ = model(x, m)
            ii = torch.as_tensor(idx)
            if task == "classification":
                loss = torch.nn.functional.cross_entropy(out, target[ii].to(device), weight=weight)
            elif cfg.loss == "nll":
                loss = discrete_nll(out, target[ii].to(device), t_event[ii].to(device))
            else:
                loss = cox_loss(out, t_time[ii].to(device), t_event[ii].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, FoldAux(mean, std, edges, device)


def predict(model, aux: FoldAux, bags, task: str, cfg, chunk: int = 16):
    """(outputs, attention per bag): class probabilities (B, C) or risks (B,), and (N_i,) attention."""
    import torch

    outs, atts = [], []
    with torch.no_grad():
        for s in range(0, len(bags), chunk):
            part = bags[s:s + chunk]
            x, m = pad_bags([((b.features - aux.mean) / aux.std).astype(np.float32) for b in part], aux.device)
            out, w = model(x, m)
            if task == "classification":
                out = torch.softmax(out, dim=1)
            elif cfg.loss == "nll":
                out = discrete_risk(out)
            else:
                out = out.reshape(-1)
            outs.append(out.cpu().numpy().astype(float))
            w = w.cpu().numpy()
            atts += [w[j, : len(b.features)].astype(np.float32) for j, b in enumerate(part)]
    return np.concatenate(outs), atts
