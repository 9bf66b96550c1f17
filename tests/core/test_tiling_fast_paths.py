"""The fast paths of tiling give exactly what the plain paths give.

* ``TiffBackend.read_patches`` (tiles decoded once, JPEG tiles decoded straight into
  patches) equals ``read_region`` patch by patch, aligned or not, at the image edge too.
* ``store.patch_writer`` and ``store.block_marker`` write the same chunk (and shard) files,
  byte for byte, as zarr's own ``arr[a:b] = pix`` and ``arr[b] = 1``; ``store.shard_reader``
  reads what zarr reads.
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from napari_protodiff.core.grid import plan_grid, read_block
from napari_protodiff.core.slide import open_slide
from napari_protodiff.core.errors import StoreError
from napari_protodiff.core.store import (COMPRESSIONS, PATCH_CHUNK_KEYS, block_marker, blocks_done,
                                         patch_compressors, patch_reader, patch_rows, patch_writer, raw_shard_nbytes,
                                         shard_file_spec, shard_reader, write_shard_file)
from napari_protodiff.core.tissue import detect_tissue


@pytest.fixture(scope="module")
def jpeg_tiff(tmp_path_factory, he_png):
    """A real H&E region as a 2-level JPEG-tiled TIFF (256-px tiles, 0.5 µm/px), 1000 x 1000 px."""
    img = np.asarray(Image.open(he_png).convert("RGB"))
    path = tmp_path_factory.mktemp("tiff") / "he.tiff"
    res = 1e4 / 0.5
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                 resolution=(res, res), resolutionunit="CENTIMETER")
        tw.write(np.ascontiguousarray(img[::2, ::2]), tile=(256, 256), compression="jpeg", subfiletype=1,
                 photometric="rgb", resolution=(res / 2, res / 2), resolutionunit="CENTIMETER")
    return path


@pytest.mark.parametrize("size,xs,ys", [
    (256, [0, 256, 512, 0], [0, 0, 256, 512]),            # a patch is a tile: decoded in place
    (128, [0, 128, 384, 640], [0, 128, 256, 768]),        # several patches per tile
    (200, [10, 190, 333, 799], [5, 240, 500, 799]),       # across tiles, up to the edge
    (256, [-40, 900, 500], [-10, 100, 900]),              # partly outside: white
])
def test_read_patches_equals_read_region(jpeg_tiff, size, xs, ys):
    with open_slide(jpeg_tiff) as s:
        assert s.info.backend == "tiff"
        got = s._backend.read_patches(0, np.array(xs), np.array(ys), size)
        for i, (x, y) in enumerate(zip(xs, ys)):
            np.testing.assert_array_equal(got[i], s.read_region(0, x, y, size, size))


def test_regions_and_patches_equal_tifffiles_own_decoding(jpeg_tiff):
    """Region reads and patches decode each JPEG tile into a buffer of their own (unaligned
    rows, see empty_rgb); the pixels are tifffile's, whole level and edges included."""
    from napari_protodiff.core.backends._common import empty_rgb

    with tifffile.TiffFile(jpeg_tiff) as tif:
        ref = tif.pages[0].asarray()
    with open_slide(jpeg_tiff) as s:
        h, w = ref.shape[:2]
        np.testing.assert_array_equal(s.read_region(0, 0, 0, w, h), ref)
        np.testing.assert_array_equal(s.read_region(0, 100, 37, 300, 420), ref[37:457, 100:400])
        got = s._backend.read_patches(0, np.array([0, 256]), np.array([256, 0]), 256)
        np.testing.assert_array_equal(got[0], ref[256:512, :256])
        np.testing.assert_array_equal(got[1], ref[:256, 256:512])
        assert got.ctypes.data % 32 != 0 and got.flags.c_contiguous  # the cached-store path of libjpeg-turbo
    for shape in ((256, 256, 3), (5, 240, 240, 3), (1, 1, 3)):
        a = empty_rgb(shape)
        assert a.shape == shape and a.dtype == np.uint8 and a.flags.c_contiguous and a.ctypes.data % 64 == 8


@pytest.mark.parametrize("size,mpp", [(256, 0.5), (128, 1.0), (100, 0.6)])
def test_read_block_equals_region_crops(jpeg_tiff, size, mpp):
    with open_slide(jpeg_tiff) as s:
        grid = plan_grid(s, detect_tissue(s), size, mpp, 0.0, block_px=512)
        for b in range(grid.n_blocks):
            c = grid.coords[grid.block_start[b] : grid.block_start[b + 1]]
            pix = read_block(s, grid.level, grid.level_downsample, grid.read_size, size, c)
            for i, (x, y) in enumerate(c):
                lx, ly = int(x // grid.level_downsample), int(y // grid.level_downsample)
                crop = s.read_region(grid.level, lx, ly, grid.read_size, grid.read_size)
                if grid.resampled:
                    crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS))
                np.testing.assert_array_equal(pix[i], crop)


@pytest.mark.parametrize("size,mpp", [(256, 0.5), (128, 1.0), (100, 0.6)])
def test_iter_block_gives_read_blocks_patches(jpeg_tiff, size, mpp):
    """Patch by patch (one reused buffer where patches are tiles) equals the whole block."""
    from napari_protodiff.core.grid import iter_block

    with open_slide(jpeg_tiff) as s:
        grid = plan_grid(s, detect_tissue(s), size, mpp, 0.0, block_px=512)
        args = (s, grid.level, grid.level_downsample, grid.read_size, size)
        for b in range(grid.n_blocks):
            c = grid.coords[grid.block_start[b] : grid.block_start[b + 1]]
            got = [p.copy() for p in iter_block(*args, c)]
            np.testing.assert_array_equal(np.stack(got), read_block(*args, c))


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("keys", [PATCH_CHUNK_KEYS, None])
def test_patch_writer_writes_what_zarr_writes(tmp_path, jpeg_tiff, keys, compression):
    with open_slide(jpeg_tiff) as s:
        pix = s._backend.read_patches(0, np.array([0, 256, 512, 0, 256]), np.array([0, 0, 0, 256, 256]), 256)
    pix[2] = 0  # equal to the fill value: zarr stores no chunk for it
    written = {}
    for how in ("zarr", "direct"):
        g = zarr.open_group(str(tmp_path / f"{how}.zarr"), mode="w", zarr_format=3)
        kw = {} if keys is None else {"chunk_key_encoding": keys}
        a = g.create_array("patches", shape=(6, 256, 256, 3), chunks=(1, 256, 256, 3), dtype="uint8",
                           compressors=patch_compressors(compression), fill_value=0, **kw)
        if how == "zarr":
            a[0:2], a[2:5] = pix[:2], pix[2:]
        else:
            w = patch_writer(a)
            assert w.__name__ == "direct"
            w(0, pix[:2])
            w(2, pix[2:])
        written[how] = _files(tmp_path / f"{how}.zarr")
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / f"{how}.zarr" / "patches"))[:5], pix)
    assert written["zarr"] == written["direct"]
    assert sum(k.startswith("patches") for k in written["direct"]) == 1 + 4  # zarr.json + 4 non-empty chunks


def test_block_marker_writes_what_zarr_writes(tmp_path):
    """Each mark is on disk when it returns, and the files are zarr's own for ``arr[b] = 1``:
    raw one-chunk arrays (a new store's; bytes written in place), raw arrays of several
    chunks (the edge chunk kept whole, as zarr does), and the older compressed chunk a block."""
    for chunks, compressors in (((7,), None), ((3,), None), ((1,), "auto")):
        written = {}
        for how in ("zarr", "marker"):
            root = tmp_path / f"{how}-{chunks[0]}.zarr"
            g = zarr.open_group(str(root), mode="w", zarr_format=3)
            a = g.create_array("block_done", shape=(7,), chunks=chunks, dtype="uint8", fill_value=0,
                               compressors=compressors)
            mark = (lambda b, a=a: a.__setitem__(b, 1)) if how == "zarr" else block_marker(a)
            seen = []  # (every chunk gets a mark: zarr stores no chunk of zeros, the marker makes them at once)
            for b in (3, 0, 6, 5):
                mark(b)
                seen.append(b)
                on_disk = zarr.open_array(str(root / "block_done"))[:].tolist()
                assert on_disk == [int(i in seen) for i in range(7)]
            written[how] = _files(root)
        assert written["zarr"] == written["marker"]
        if compressors is None:
            assert sum(k.startswith("block_done") and "zarr.json" not in k for k in written["marker"]) == -(-7 // chunks[0])


def test_block_marker_keeps_blocks_already_done(tmp_path):
    """A resumed slide's marker leaves what is on disk: it never undoes a block."""
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    a = g.create_array("block_done", shape=(6,), chunks=(6,), dtype="uint8", fill_value=0, compressors=None)
    a[[0, 4]] = 1
    mark = block_marker(a)
    mark(2)
    assert blocks_done(a).tolist() == [True, False, True, False, True, False]
    with pytest.raises(IndexError):
        mark(6)


def test_a_new_slide_marks_its_blocks_in_one_file(tmp_path, jpeg_tiff):
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.tiling import TilingConfig, tile_slides

    store = tmp_path / "s.zarr"
    drain(tile_slides([jpeg_tiff], store, TilingConfig(size=64, min_tissue=0.0, block_px=256)))
    (d,) = [p for p in (store / "slides").iterdir() if p.is_dir()]
    assert zarr.open_array(str(d / "block_done")).shape[0] > 1
    assert sorted(f.name for f in (d / "block_done").rglob("*") if f.is_file()) == ["0", "zarr.json"]
    assert blocks_done(zarr.open_array(str(d / "block_done"))).all()


def test_blocks_done_reads_what_zarr_reads(tmp_path):
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    a = g.create_array("block_done", shape=(9,), chunks=(1,), dtype="uint8", fill_value=0)  # the older layout
    assert blocks_done(a).tolist() == [False] * 9
    mark = block_marker(a)
    for b in (8, 2, 0, 5):
        mark(b)
        assert blocks_done(a).tolist() == (a[:] == 1).tolist()
    assert blocks_done(a).tolist() == [True, False, True, False, False, True, False, False, True]
    # another layout (several blocks a chunk): read through zarr
    b2 = g.create_array("other", shape=(9,), chunks=(4,), dtype="uint8", fill_value=0)
    b2[[1, 7]] = 1
    assert blocks_done(b2).tolist() == (b2[:] == 1).tolist()
    # a chunk file that does not hold 1 is not taken on trust
    a[2] = 7
    assert blocks_done(a).tolist() == (a[:] == 1).tolist()


def _square(x):
    return x * x


@pytest.mark.parametrize("processes", [None, False])
def test_local_workers_processes_and_threads(processes):
    from napari_protodiff.core.executor import run_tasks, warm_up

    warm_up(_square, workers=2, processes=processes)
    assert sorted(run_tasks(_square, list(range(20)), workers=2, processes=processes)) == [i * i for i in range(20)]


_FORK_PROBE = """
import os, sys, threading
from napari_protodiff.core import executor

def where(_):
    return os.getppid(), "protodiff_marker" in sys.modules

if __name__ == "__main__":
    sys.modules["protodiff_marker"] = sys  # only in this process: a forked worker has it too
    if sys.argv[1] == "thread":
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
    executor.warm_up(where, workers=2)
    warm = 2 in executor._WARM
    if sys.argv[1] == "unused":
        pids = [p.pid for p in executor._WARM[2]._processes.values()]
        executor.release_warm()
        print(warm, not executor._WARM, all(not os.path.exists(f"/proc/{p}") or
              open(f"/proc/{p}/stat").read().split()[2] == "Z" for p in pids))
    else:
        out = set(executor.run_tasks(where, list(range(8)), workers=2))
        print(warm, all(ppid == os.getpid() for ppid, _ in out), all(m for _, m in out), not executor._WARM)
    if sys.argv[1] == "thread":
        stop.set()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_workers_fork_from_a_single_threaded_process_and_not_from_one_with_threads(tmp_path):
    """No other thread: warm_up forks the workers at once, and they have what the process
    imported; a process with a thread gets fork-server workers (children of the server, not
    of the process); workers started for tasks that never come are shut down."""
    import subprocess

    probe = tmp_path / "probe.py"
    probe.write_text(_FORK_PROBE)

    def run(mode):
        p = subprocess.run([sys.executable, str(probe), mode], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    assert run("plain") == ["True", "True", "True", "True"]
    assert run("thread") == ["False", "False", "False", "True"]
    assert run("unused") == ["True", "True", "True"]


def test_cancel_stops_worker_processes():
    from napari_protodiff.core.errors import Cancelled
    from napari_protodiff.core.executor import run_tasks
    from napari_protodiff.core.progress import CancelToken

    token, got = CancelToken(), []
    with pytest.raises(Cancelled):
        for r in run_tasks(_square, list(range(50)), workers=2, cancel=token):
            got.append(r)
            token.cancel()
    assert 1 <= len(got) < 50


@pytest.mark.parametrize("compression", ["none", "lz4"])
@pytest.mark.parametrize("fill", [0, 255])
def test_patch_writer_fill_value_test_looks_at_every_byte(tmp_path, fill, compression):
    """A patch is left out only if *all* of it equals the fill value (the writer first looks
    at one byte): the same files as zarr's own write, whatever the fill value."""
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    pix[0] = fill  # all fill: no chunk
    pix[1] = fill
    pix[1, 63, 63, 2] = 255 - fill  # fill at the first byte, not everywhere
    pix[2, 0, 0, 0] = fill  # fill at the first byte, random elsewhere
    pix[3, 0, 0, 0] = 255 - fill
    written = {}
    for how in ("zarr", "direct"):
        g = zarr.open_group(str(tmp_path / f"{how}.zarr"), mode="w", zarr_format=3)
        a = g.create_array("patches", shape=(4, 64, 64, 3), chunks=(1, 64, 64, 3), dtype="uint8",
                           compressors=patch_compressors(compression), fill_value=fill,
                           chunk_key_encoding=PATCH_CHUNK_KEYS)
        if how == "zarr":
            a[:] = pix
        else:
            w = patch_writer(a)
            assert w.__name__ == "direct"
            w(0, pix)
        written[how] = _files(tmp_path / f"{how}.zarr")
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / f"{how}.zarr" / "patches"))[:], pix)
    assert written["zarr"] == written["direct"]
    assert sorted(k for k in written["direct"] if k.startswith("patches/c.")) == [
        "patches/c.1.0.0.0", "patches/c.2.0.0.0", "patches/c.3.0.0.0"]


def test_blosc_encoder_gives_the_codec_bytes():
    from napari_protodiff.core.store import _blosc_encoder

    codec = patch_compressors("lz4")[0]._blosc_codec
    enc = _blosc_encoder(codec)
    assert enc is not codec.encode  # the direct call is in use with this numcodecs
    rng = np.random.default_rng(1)
    for p in (rng.integers(0, 256, 256 * 256 * 3, dtype=np.uint8), np.full(256 * 256 * 3, 240, np.uint8),
              rng.integers(200, 210, 999, dtype=np.uint8)):
        assert enc(p) == bytes(codec.encode(p.reshape(-1, 3)))


def _read_back(root, pix, reader):
    """The files under ``root``; checks that zarr and ``reader`` read ``pix`` back from its patch array."""
    b = zarr.open_array(str(root / "patches"))
    np.testing.assert_array_equal(b[:], pix)
    read = reader(b)
    for i in range(len(pix)):
        np.testing.assert_array_equal(read(i), pix[i])
    return _files(root)


def _sharded(root, n, k, s=32, fill=0, compression="lz4"):
    g = zarr.open_group(str(root), mode="w", zarr_format=3)
    return g.create_array("patches", shape=(n, s, s, 3), chunks=(1, s, s, 3), shards=(k, s, s, 3), dtype="uint8",
                          compressors=patch_compressors(compression), fill_value=fill,
                          chunk_key_encoding=PATCH_CHUNK_KEYS)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_sharded_patch_writer_writes_what_zarr_writes(tmp_path, compression):
    """Whole shards (given as one array or as a list of parts), a tail shard, a fill-value
    patch inside a shard, a shard of fill values only (no file), and a write that is not
    shard-aligned (through zarr): the same files as zarr's own writes, read back by
    zarr and by ``shard_reader``."""
    rng = np.random.default_rng(0)
    n, k = 15, 4
    pix = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    pix[:, :16] = 236  # glass-like rows: compressible
    pix[1] = 0  # a fill patch inside shard 0
    pix[8:12] = 0  # shard 2: fill values only
    written = {}
    for how in ("zarr", "direct"):
        a = _sharded(tmp_path / f"{how}.zarr", n, k, compression=compression)
        if how == "zarr":
            a[0:4], a[4:8], a[8:12], a[12:15] = pix[0:4], pix[4:8], pix[8:12], pix[12:15]
        else:
            w = patch_writer(a)
            assert w.__qualname__.startswith("shard_writer")
            w(0, [pix[0:1], pix[1:3], pix[3:4]])  # parts are not joined first
            w(4, pix[4:12])  # two shards in one call
            w(12, pix[12:15])  # the tail shard (3 of 4 patches)
        written[how] = _read_back(tmp_path / f"{how}.zarr", pix, shard_reader)
    assert written["zarr"] == written["direct"]
    assert sorted(k for k in written["direct"] if k.startswith("patches/c.")) == [
        "patches/c.0.0.0.0", "patches/c.1.0.0.0", "patches/c.3.0.0.0"]
    assert not any(".partial" in k for k in written["direct"])

    # not whole shards: merged by zarr into what is there
    a = zarr.open_array(str(tmp_path / "direct.zarr" / "patches"), mode="r+")
    patch_writer(a)(5, pix[0:2])
    expect = pix.copy()
    expect[5:7] = pix[0:2]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "direct.zarr" / "patches"))[:], expect)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_worker_shard_files_are_what_zarr_writes(tmp_path, compression):
    """A worker's shard file (``shard_file_spec`` + ``write_shard_file``, no zarr) is the
    file zarr writes, for every compression; raw patches are stored as their own bytes."""
    from napari_protodiff.core.tiling import _compressor

    rng = np.random.default_rng(2)
    n, k = 10, 4
    pix = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    pix[:, :20] = 236
    pix[5] = 0  # a fill patch: no chunk
    written = {}
    for how in ("zarr", "worker"):
        a = _sharded(tmp_path / f"{how}.zarr", n, k, compression=compression)
        if how == "zarr":
            for s0 in range(0, n, k):
                a[s0 : s0 + k] = pix[s0 : s0 + k]
        else:
            spec = shard_file_spec(a)
            assert spec is not None and (spec["blosc"] == "raw") == (compression == "none")
            encode = _compressor(spec["blosc"])
            for i, s0 in enumerate(range(0, n, k)):
                # as tile_block gives them: a generator (one reused buffer), the raw size reserved
                # (more than is written where a patch is the fill value: the file is cut back)
                buf = np.empty_like(pix[0]).reshape(-1)
                rows = (np.copyto(buf, r) or buf for r in patch_rows(pix[s0 : s0 + k]))
                hint = raw_shard_nbytes(spec, len(pix[s0 : s0 + k]), pix[0].nbytes)
                write_shard_file(os.path.join(spec["root"], spec["keys"][i]), rows, k, spec["fill"], encode, hint)
        written[how] = _read_back(tmp_path / f"{how}.zarr", pix, patch_reader)
    assert written["zarr"] == written["worker"]
    for f in (tmp_path / "worker.zarr" / "patches").iterdir():  # nothing reserved is left past the end
        assert f.stat().st_blocks * 512 <= -(-f.stat().st_size // 4096) * 4096
    shard0 = (tmp_path / "worker.zarr" / "patches" / "c.0.0.0.0").read_bytes()
    if compression == "none":  # the chunks are the patches' bytes, one after the other
        assert shard0[: 4 * pix[0].nbytes] == pix[:4].tobytes()
    else:
        assert len(shard0) < 4 * pix[0].nbytes


def test_unknown_compression_is_refused(tmp_path):
    with pytest.raises(StoreError, match="unknown patch compression 'gzip'"):
        patch_compressors("gzip")


def test_shard_reader_refuses_a_corrupt_index(tmp_path):
    a = _sharded(tmp_path / "s.zarr", 8, 4)
    pix = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    patch_writer(a)(0, pix)
    f = tmp_path / "s.zarr" / "patches" / "c.1.0.0.0"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # inside the index
    f.write_bytes(bytes(raw))
    read = shard_reader(zarr.open_array(str(tmp_path / "s.zarr" / "patches")))
    np.testing.assert_array_equal(read(2), pix[2])  # shard 0 is intact
    with pytest.raises(StoreError, match="c.1.0.0.0: the shard's index is corrupt"):
        read(5)
