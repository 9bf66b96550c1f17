"""The k-means engine: determinism, quality against scikit-learn, mini-batch, membership, errors."""

from __future__ import annotations

import numpy as np
import pytest

from napari_protodiff.core.errors import Cancelled, ProtodiffError
from napari_protodiff.core.kmeans import assign, kmeans, kmeans_job, silhouette, soft_membership, sqdist_matrix


def blobs(n=3000, d=16, k=5, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32) * 3
    y = rng.integers(0, k, n)
    return (centers[y] + rng.standard_normal((n, d)).astype(np.float32) * spread).astype(np.float32), y


def ari(a, b):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b)


def test_same_seed_same_result_and_labels_are_nearest_centres():
    x, _ = blobs()
    a = kmeans(x, 5, seed=3, restarts=2)
    b = kmeans(x, 5, seed=3, restarts=2)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.centroids, b.centroids)
    lab, d = assign(x, a.centroids)
    assert np.array_equal(lab, a.labels)
    assert a.inertia == pytest.approx(float(d.astype(np.float64).sum()), rel=1e-5)
    assert len(a.restart_inertias) == 2 and a.inertia == min(a.restart_inertias)


def test_recovers_blobs_and_matches_sklearn_inertia():
    pytest.importorskip("sklearn")
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x, y = blobs(k=6, seed=1)
    ours = kmeans(x, 6, seed=0, restarts=3)
    with threadpool_limits(1):
        ref = KMeans(6, n_init=3, random_state=0).fit(x)
    assert ari(y, ours.labels) > 0.99
    assert ours.inertia <= ref.inertia_ * 1.001


def test_minibatch_is_deterministic_and_good():
    x, y = blobs(n=40000, d=8, k=8, seed=2)
    a = kmeans(x, 8, seed=1, algorithm="minibatch", batch_size=2048)
    b = kmeans(x, 8, seed=1, algorithm="minibatch", batch_size=2048)
    assert a.algorithm == "minibatch"
    assert np.array_equal(a.labels, b.labels)
    lloyd = kmeans(x, 8, seed=1, algorithm="lloyd")
    assert a.inertia <= lloyd.inertia * 1.02
    assert ari(y, a.labels) > 0.95


def test_soft_membership():
    x, _ = blobs(n=500)
    r = kmeans(x, 5, seed=0)
    d = sqdist_matrix(x, r.centroids)
    m = soft_membership(d, r.inertia / len(x))
    assert m.shape == (500, 5) and np.allclose(m.sum(1), 1, atol=1e-5)
    assert np.array_equal(m.argmax(1), r.labels)
    hard = soft_membership(d, 1e-6)
    assert np.allclose(hard.max(1), 1.0)
    flat = soft_membership(d, 1e9)
    assert np.allclose(flat, 0.2, atol=1e-3)
    with pytest.raises(ProtodiffError, match="temperature"):
        soft_membership(d, 0)


def test_silhouette_matches_sklearn():
    pytest.importorskip("sklearn")
    from sklearn.metrics import silhouette_score

    x, y = blobs(n=600, k=4)
    assert silhouette(x, y, sample_size=10_000) == pytest.approx(silhouette_score(x, y), abs=1e-4)


@pytest.mark.parametrize(
    "x,k,match",
    [
        (np.zeros((5, 3), np.float32), 6, "larger than the number of patches"),
        (np.zeros((0, 3), np.float32), 2, "no embeddings"),
        (np.zeros((5, 3), np.float32), 0, "at least 1"),
        (np.array([[0, 1], [np.nan, 1], [2, 2]], np.float32), 2, "NaN or infinite"),
        (np.array([[0, 1], [np.inf, 1], [2, 2]], np.float32), 2, "NaN or infinite"),
    ],
)
def test_bad_input(x, k, match):
    with pytest.raises(ProtodiffError, match=match):
        kmeans(x, k)


def test_job_reports_progress_and_cancels():
    x, _ = blobs(n=2000)
    gen = kmeans_job(x, 5, seed=0, restarts=2)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert events and result.labels.shape == (2000,)
    from napari_protodiff.core.progress import CancelToken

    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        for _ in kmeans_job(x, 5, cancel=token, max_iter=50, tol=0):
            pass
