"""The hybrid sampler, the zarr patch source and the multi-crop views."""

from __future__ import annotations

import numpy as np
import pytest


def test_patch_source_reads_what_zarr_reads(real_store):
    import zarr

    from napari_protodiff.core.ssl.data import PatchSource

    src = PatchSource(real_store)
    assert len(src) > 100
    sid, j = src.locate(57)
    ref = zarr.open_group(str(real_store), mode="r")["slides"][sid]["patches"][j]
    np.testing.assert_array_equal(src.read(57), ref)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.75, 1.0])
def test_sampler_draws_the_requested_real_share_exactly(fraction):
    from napari_protodiff.core.ssl.data import REAL, SYNTHETIC, HybridSampler

    s = HybridSampler([50, 20, 7], [REAL, SYNTHETIC, SYNTHETIC], fraction, images_per_epoch=200, batch_size=8)
    plan = s.plan(3)
    real = np.isin(plan[:, 0], [0]).sum()
    assert len(plan) == 200 and real == round(fraction * 200)
    # a pool is cycled evenly: no patch drawn twice before every patch was drawn once
    counts = np.bincount(plan[plan[:, 0] == 0, 1], minlength=50) if real else np.zeros(50)
    assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(plan, s.plan(3))  # deterministic per epoch
    assert not np.array_equal(plan, s.plan(4))


def test_sampler_splits_each_step_between_processes():
    from napari_protodiff.core.ssl.data import REAL, HybridSampler

    keys = []
    for rank in range(2):
        s = HybridSampler([30], [REAL], 1.0, images_per_epoch=40, batch_size=4, rank=rank, world=2)
        assert s.steps_per_epoch == 5 and len(s) == 20
        keys.append(list(s))
    whole = HybridSampler([30], [REAL], 1.0, images_per_epoch=40, batch_size=4, rank=0, world=2).plan(0)
    assert sorted(map(tuple, keys[0] + keys[1])) == sorted(map(tuple, whole.tolist()))
    resumed = HybridSampler([30], [REAL], 1.0, 40, 4, rank=1, world=2, start_step=3)
    assert list(resumed) == keys[1][12:]


def test_hybrid_loader_reads_both_stores_in_the_requested_proportion(real_store, other_store):
    """Counted on what the worker processes actually loaded, not on the plan."""
    from napari_protodiff.core.ssl.augment import HEMultiCrop
    from napari_protodiff.core.ssl.data import REAL, SYNTHETIC, HybridSampler, MultiCropDataset, make_loader, open_sources

    sources = open_sources([str(real_store)], [str(other_store)])
    s = HybridSampler([len(x) for x in sources], [x.kind for x in sources], 0.25, images_per_epoch=64, batch_size=8)
    loader = make_loader(MultiCropDataset(sources, HEMultiCrop(32, 16, 1)), s, 8, workers=2)
    kinds, srcs = [], []
    for views, k, src in loader:
        assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32), (8, 3, 32, 32), (8, 3, 16, 16)]
        kinds += k.tolist()
        srcs += src.tolist()
    assert kinds.count(REAL) == 16 and kinds.count(SYNTHETIC) == 48
    assert srcs.count(0) == 16 and srcs.count(1) == 48


def test_views_depend_on_the_seed_not_on_the_worker_count(real_store):
    import torch

    from napari_protodiff.core.ssl.augment import HEMultiCrop
    from napari_protodiff.core.ssl.data import REAL, HybridSampler, MultiCropDataset, make_loader, open_sources

    sources = open_sources([str(real_store)], [])
    batches = []
    for workers in (0, 2):
        s = HybridSampler([len(sources[0])], [REAL], 1.0, images_per_epoch=8, batch_size=4, seed=5)
        loader = make_loader(MultiCropDataset(sources, HEMultiCrop(32, 16, 2)), s, 4, workers=workers)
        batches.append([torch.cat([v.flatten() for v in views]) for views, _, _ in loader])
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_he_views_flips_rotations_and_stain_jitter_keep_range():
    import torch

    from napari_protodiff.core.ssl.augment import HEMultiCrop, hed_jitter

    rng = np.random.default_rng(0)
    patch = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    t = HEMultiCrop(32, 16, 3)
    torch.manual_seed(1)
    v1 = t(patch)
    torch.manual_seed(1)
    v2 = t(patch)
    assert len(v1) == 5 and all(torch.equal(a, b) for a, b in zip(v1, v2))
    img = torch.from_numpy(patch).permute(2, 0, 1).float() / 255
    assert torch.allclose(hed_jitter(img, 0.0), img)
    j = hed_jitter(img, 0.05)
    assert j.min() >= 0 and j.max() <= 1 and (j - img).abs().mean() < 0.1
