"""The zarr patch store: patches of many slides with coordinates and provenance.

Layout (zarr format 3; see docs/patch-store.md)::

    STORE.zarr/                       attrs["protodiff"] = {kind, format_version, patch_size, mpp, slides: [...]}
      slides/<slide_id>/              attrs["protodiff"] = slide provenance and status
        patches          (N, S, S, 3) uint8, one chunk per patch; tiled stores keep K
                         consecutive chunks in one shard file (zarr sharding), one per block
        coords           (N, 2) int64, level-0 (x, y) of each patch's top-left corner
        tissue_fraction  (N,) float32
        block_start      (B + 1,) int64, patches of block b are block_start[b]:block_start[b+1]
        block_done       (B,) uint8, raw bytes, one chunk: 1 once block b's patches are written

A slide's ``status`` is ``"tiling"`` until every block is written and ``"complete"``
after; readers skip incomplete slides, and tiling the same slide again resumes it.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import StoreError

STORE_KIND = "patch-store"
#: Blocks a chunk of a new ``block_done`` array (one chunk of raw bytes for any slide this side
#: of ~250,000 blocks). Stores before 2026-11-30 have one compressed chunk a block.
BLOCK_DONE_CHUNK = 1 << 18
FORMAT_VERSION = 1


#: Lossless compressions a patch array can be stored with (``TilingConfig.compression``).
COMPRESSIONS = ("none", "lz4", "zstd")


def patch_compressors(compression: str = "none") -> list:
    """zarr compressors of a patch array. Patches decoded from JPEG-compressed slides are close
    to incompressible without loss: on 256-px, 0.5 µm/px tissue patches of the real samples
    LZ4 saves 0.1-9 % (0.08-0.14 ms a patch) and zstd-1 5-19 % (0.4-0.6 ms a patch, about
    as long as decoding the JPEG tile the patch came from); see docs/benchmarks.md. So by default
    patches are stored as raw bytes: tiling writes them without a copy and reading them
    needs no decoding. ``"lz4"`` (Blosc-LZ4 level 5, the stores before 2026-11-30) and
    ``"zstd"`` (Blosc-zstd level 1) trade CPU for disk."""
    if compression == "none":
        return []
    from zarr.codecs import BloscCodec, BloscShuffle

    if compression == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.noshuffle)]
    if compression == "zstd":
        return [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.noshuffle)]
    raise StoreError(f"unknown patch compression {compression!r}; use one of {', '.join(COMPRESSIONS)}.")


#: Patch chunks as ``c.<i>.0.0.0`` files in the array's folder: zarr's default ``/``
#: separator would make three folders for every patch, which costs more than the write.
PATCH_CHUNK_KEYS = {"name": "default", "separator": "."}


def patch_writer(arr) -> Callable[[int, "np.ndarray | Sequence[np.ndarray]"], None]:
    """``write(start, pix)``: store ``pix`` as ``arr[start : start + len(pix)]`` (``pix`` an
    array of patches, or a list of such arrays written one after the other).

    For the patch arrays this package makes (zarr format 3 in a local folder, one patch
    a chunk, ``bytes`` + ``blosc`` codecs, optionally in shards of K patches) each chunk
    is encoded with the parameters of zarr's own blosc codec and written straight to its
    file: the same bytes in the same files as ``arr[start:stop] = pix`` (a chunk equal to
    the fill value is not stored, as zarr does), without zarr's per-chunk overhead
    (event-loop and thread hand-offs, a ``mkdir`` of the chunk's folders and a temporary
    file renamed per chunk), which costs more than the encoding itself.

    * Unsharded: per patch one ``blosc`` call on the patch's own memory, and ``open``
      (relative to the array's folder), ``write``, ``close``; nothing is synced. A
      block's files are not each atomic, but a block only counts once ``block_done`` is
      set after it, and an unfinished block is written again on resume.
    * Sharded (:func:`shard_writer`): a call that covers whole shards writes each shard
      file at once (encoded chunks, then zarr's shard index and its CRC-32C), to a
      temporary name renamed into place; any other range goes through zarr.

    Any other array is written through zarr.
    """

    def through_zarr(start: int, pix) -> None:
        pix = _joined(pix)
        arr[start : start + len(pix)] = pix

    sharded = shard_writer(arr)
    if sharded is not None:
        return sharded
    try:
        import zarr
        from zarr.storage import LocalStore

        md = arr.metadata
        ok = (
            md.zarr_format == 3
            and isinstance(arr.store, LocalStore)
            and arr.dtype == np.uint8
            and tuple(md.chunk_grid.chunk_shape) == (1, *arr.shape[1:])
            and _chunk_codec(md.codecs) is not None
            and not zarr.config.get("array.write_empty_chunks")
        )
        if not ok:
            return through_zarr
        encode = _blosc_encoder(_chunk_codec(md.codecs))  # the numcodecs Blosc zarr itself encodes with
        fill = int(md.fill_value)
        chunk_key = md.chunk_key_encoding.encode_chunk_key
        root = os.path.join(str(arr.store.root), arr.path)
    except Exception:  # pragma: no cover - another zarr layout: use the public API
        return through_zarr
    tail = (0,) * (arr.ndim - 1)
    made: set[str] = set()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    dir_fd_ok = os.open in os.supports_dir_fd
    # The ``c.<i>.0.0.0`` keys (PATCH_CHUNK_KEYS) as a string format, if that is what the encoding gives.
    suffix = "".join(".0" for _ in tail)
    if all(chunk_key((i, *tail)) == f"c.{i}{suffix}" for i in (0, 7, 12345)):
        chunk_key = lambda idx: f"c.{idx[0]}{suffix}"  # noqa: E731

    def direct(start: int, pix) -> None:
        pix = np.ascontiguousarray(_joined(pix), dtype=np.uint8)
        flat = pix.reshape(len(pix), -1)
        dfd = os.open(root, os.O_RDONLY) if dir_fd_ok else None
        try:
            for i in range(len(flat)):
                key = chunk_key((start + i, *tail))
                p = flat[i]
                if _is_fill(p, fill):
                    try:
                        os.unlink(os.path.join(root, key))
                    except FileNotFoundError:
                        pass
                    continue
                data = encode(p)
                if dfd is not None and "/" not in key:
                    fd = os.open(key, flags, 0o666, dir_fd=dfd)
                else:
                    path = os.path.join(root, key)
                    folder = os.path.dirname(path)
                    if folder not in made:
                        os.makedirs(folder, exist_ok=True)
                        made.add(folder)
                    fd = os.open(path, flags, 0o666)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
        finally:
            if dfd is not None:
                os.close(dfd)

    return direct


def _joined(pix) -> np.ndarray:
    """One array of patches from an array or a list of arrays."""
    if isinstance(pix, np.ndarray):
        return pix
    return pix[0] if len(pix) == 1 else np.concatenate(pix)


def _is_fill(p: np.ndarray, fill: int) -> bool:
    """Is the flat uint8 patch ``p`` entirely ``fill``? (A patch rarely is: its first byte usually says so.)"""
    return bool(p[0] == fill and ((not p.any()) if fill == 0 else bool((p == fill).all())))


#: zarr's marker for an absent chunk in a shard index.
_NO_CHUNK = np.uint64(2**64 - 1)

#: A patch array stored without compression (``bytes`` codec only).
_RAW = "raw"


def _chunk_codec(codecs) -> Any:
    """The numcodecs ``Blosc`` of a patch chunk's codecs ``bytes`` + ``blosc``, :data:`_RAW`
    for ``bytes`` alone, ``None`` for anything else."""
    from zarr.codecs import BloscCodec, BytesCodec

    codecs = tuple(codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    if len(codecs) == 1:
        return _RAW
    if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
        return codecs[1]._blosc_codec
    return None


def _raw_row(p: np.ndarray) -> np.ndarray:
    """The encoding of an uncompressed chunk: the patch's own bytes (written without a copy)."""
    return p


def _decoder(codec) -> Callable[[bytes], bytes]:
    return (lambda raw: raw) if codec == _RAW else codec.decode


def _shard_layout(arr) -> dict[str, Any] | None:
    """What :func:`shard_writer` and :func:`shard_reader` need, when ``arr`` is a patch array
    this package shards: zarr format 3 in a local folder, shards of (K, S, S, 3) holding
    one-patch chunks encoded ``bytes`` + ``blosc``, the index (``bytes`` little-endian +
    ``crc32c``) at the end. ``None`` for any other array."""
    try:
        import zarr
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.codecs.sharding import ShardingCodecIndexLocation
        from zarr.storage import LocalStore

        md = arr.metadata
        if md.zarr_format != 3 or not isinstance(arr.store, LocalStore) or arr.dtype != np.uint8:
            return None
        if len(md.codecs) != 1 or not isinstance(md.codecs[0], ShardingCodec):
            return None
        sc = md.codecs[0]
        shard = tuple(md.chunk_grid.chunk_shape)
        inner, index = tuple(sc.codecs), tuple(sc.index_codecs)
        ok = (
            tuple(sc.chunk_shape) == (1, *arr.shape[1:])
            and shard[1:] == tuple(arr.shape[1:])
            and _chunk_codec(inner) is not None
            and len(index) == 2 and isinstance(index[0], BytesCodec) and str(getattr(index[0].endian, "value", ""))
            == "little" and isinstance(index[1], Crc32cCodec)
            and sc.index_location == ShardingCodecIndexLocation.end
            and not zarr.config.get("array.write_empty_chunks")
        )
        if not ok:
            return None
        tail = (0,) * (arr.ndim - 1)
        return {
            "k": int(shard[0]),
            "n": int(arr.shape[0]),
            "blosc": _chunk_codec(inner),
            "fill": int(md.fill_value),
            "root": os.path.join(str(arr.store.root), arr.path),
            "key": lambda k: md.chunk_key_encoding.encode_chunk_key((k, *tail)),
            "patch_shape": tuple(arr.shape[1:]),
        }
    except Exception:  # pragma: no cover - another zarr: use the public API
        return None


def shard_writer(arr) -> Callable[[int, np.ndarray], None] | None:
    """The sharded direct path of :func:`patch_writer` (``None`` if ``arr`` is not such an array)."""
    lay = _shard_layout(arr)
    if lay is None:
        return None
    k, n, fill, root, key = lay["k"], lay["n"], lay["fill"], lay["root"], lay["key"]
    encode = _blosc_encoder(lay["blosc"])

    def through_zarr(start: int, pix) -> None:
        pix = _joined(pix)
        arr[start : start + len(pix)] = pix

    def direct(start: int, pix) -> None:
        rows = patch_rows(pix)
        stop = start + len(rows)
        if start % k or (stop % k and stop != n):  # not whole shards: let zarr merge
            through_zarr(start, pix)
            return
        for s in range(start, stop, k):
            write_shard_file(os.path.join(root, key(s // k)), rows[s - start : s - start + k], k, fill, encode)

    return direct


def shard_file_spec(arr) -> dict[str, Any] | None:
    """What writing one shard file of ``arr`` takes without zarr (plain, picklable values), or
    ``None`` when ``arr`` is not a sharded patch array whose blosc encoding is reproduced
    exactly: ``{"root", "keys", "k", "n", "fill", "blosc"}`` with ``keys[i]`` shard ``i``'s
    file under ``root`` and ``blosc`` the parameters of :func:`blosc_compressor` (``"raw"``
    for an uncompressed array). Worker processes write with it (:func:`write_shard_file`, after
    :func:`blosc_compressor`) without importing zarr, which costs them about a second."""
    lay = _shard_layout(arr)
    params = None if lay is None else _blosc_params(lay["blosc"])
    if params is None:
        return None
    n_shards = -(-lay["n"] // lay["k"])
    return {"root": lay["root"], "keys": [lay["key"](i) for i in range(n_shards)], "k": lay["k"], "n": lay["n"],
            "fill": lay["fill"], "blosc": params}


def patch_rows(pix) -> list[np.ndarray]:
    """Patches (an array, or a list of arrays one after the other) as flat uint8 rows, not copied."""
    parts = [pix] if isinstance(pix, np.ndarray) else list(pix)
    return [r for part in parts for r in np.ascontiguousarray(part, dtype=np.uint8).reshape(len(part), -1)]


def _write_all(fd: int, data) -> None:
    data = memoryview(data)
    while data:
        data = data[os.write(fd, data) :]


def _index_nbytes(k: int) -> int:
    """Bytes of a shard's index: (offset, length) as two uint64 per chunk, then a CRC-32C."""
    return 16 * k + 4


def raw_shard_nbytes(spec: dict[str, Any], n: int, patch_nbytes: int) -> int:
    """The size of a shard file of ``n`` patches for a shard spec (:func:`shard_file_spec`)
    of raw patches (each chunk is the patch's bytes), or 0 when compressed (not known ahead)."""
    return n * patch_nbytes + _index_nbytes(spec["k"]) if spec["blosc"] == _RAW else 0


@functools.cache
def _fallocate():
    """libc's ``fallocate`` (Linux), or ``None``: unlike ``os.posix_fallocate`` it never
    falls back to writing zeros where the file system cannot reserve space."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        f = libc.fallocate
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    f.restype = ctypes.c_int
    return f


def _reserve(fd: int, nbytes: int) -> None:
    """Reserve ``nbytes`` for a file being written (``FALLOC_FL_KEEP_SIZE``: its size stays
    what is written), if the file system can; otherwise nothing."""
    f = _fallocate()
    if f is not None:
        f(fd, 1, 0, nbytes)  # 1 = FALLOC_FL_KEEP_SIZE; a failure (EOPNOTSUPP...) changes nothing


def write_shard_file(path: str, rows: Iterable[np.ndarray], k: int, fill: int, encode: Callable[[np.ndarray], bytes],
                     size_hint: int = 0) -> None:
    """Write one shard file of a sharded patch array, byte for byte what zarr writes: the
    encoded chunks that are not all ``fill``, then the (K, 2) little-endian index of
    (offset, length) pairs and its CRC-32C. The file is written under a temporary name
    and renamed into place; a shard of fill values only is not stored (an old one is removed).

    ``rows`` (flat uint8 patches, at most ``k``) may be a generator that decodes each patch
    into one reused buffer: each is written before the next is asked for. ``size_hint``:
    the file's expected size (:func:`raw_shard_nbytes`), reserved at once where the file
    system can (fewer, larger block allocations than one per write)."""
    import google_crc32c  # zarr's own CRC-32C for shard indexes

    # Each chunk is written as soon as it is encoded, while it is still in the CPU's
    # cache (joining a shard's chunks first costs two more passes over cold memory).
    index = np.full((k, 2), _NO_CHUNK, dtype="<u8")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.partial"
    offset = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if size_hint > 0:
            _reserve(fd, size_hint)
        for i, row in enumerate(rows):
            if i >= k:
                raise ValueError(f"more than {k} patches for one shard")
            if _is_fill(row, fill):
                continue
            data = encode(row)
            _write_all(fd, data)
            index[i] = (offset, len(data))
            offset += len(data)
        if offset:
            index_bytes = index.tobytes()
            _write_all(fd, index_bytes + np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes())
            if size_hint > offset + _index_nbytes(k):  # fewer patches than reserved (fill values)
                os.ftruncate(fd, offset + _index_nbytes(k))
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    if not offset:  # every chunk is the fill value: zarr stores no shard
        os.unlink(tmp)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    os.replace(tmp, path)


def shard_reader(arr) -> Callable[[int], np.ndarray] | None:
    """``read(i) -> arr[i]`` for a sharded patch array (``None`` for any other): each
    shard's index is read once (and its CRC-32C checked), then a patch is one ``pread``
    and one ``blosc`` decode. zarr 3.1 itself spends about 1-2 ms on a single patch read
    from a shard."""
    lay = _shard_layout(arr)
    if lay is None:
        return None
    import google_crc32c

    k, fill, root, key, shape = lay["k"], lay["fill"], lay["root"], lay["key"], lay["patch_shape"]
    decode = _decoder(lay["blosc"])
    nbytes_index = _index_nbytes(k)
    indexes: dict[int, np.ndarray | None] = {}

    def shard_index(sh: int, fd: int) -> np.ndarray:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, nbytes_index, size - nbytes_index)
        body, crc = raw[:-4], raw[-4:]
        if len(raw) != nbytes_index or np.uint32(google_crc32c.value(body)).astype("<u4").tobytes() != crc:
            raise StoreError(f"{os.path.join(root, key(sh))}: the shard's index is corrupt (checksum mismatch).")
        return np.frombuffer(body, dtype="<u8").reshape(k, 2)

    def read(i: int) -> np.ndarray:
        sh, j = divmod(int(i), k)
        try:
            fd = os.open(os.path.join(root, key(sh)), os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:  # a shard of fill values is not stored
            return np.full(shape, fill, np.uint8)
        try:
            idx = indexes.get(sh)
            if idx is None:
                idx = indexes[sh] = shard_index(sh, fd)
            off, length = idx[j]
            if off == _NO_CHUNK:
                return np.full(shape, fill, np.uint8)
            raw = os.pread(fd, int(length), int(off))
        finally:
            os.close(fd)
        return np.frombuffer(decode(raw), dtype=np.uint8).reshape(shape)

    return read


def _blosc_params(codec) -> tuple | str | None:
    """``(cname, clevel, shuffle, blocksize, typesize)`` of a numcodecs ``Blosc`` when
    :func:`blosc_compressor` of them encodes exactly as ``codec.encode`` (compared on a
    test buffer), else ``None``; :data:`_RAW` for an uncompressed array's ``_RAW``."""
    if codec == _RAW:
        return _RAW
    try:
        cfg = codec.get_config()
        params = (str(cfg["cname"]), int(cfg["clevel"]), int(cfg["shuffle"]), int(cfg.get("blocksize", 0)),
                  cfg.get("typesize"))
        probe = np.random.default_rng(0).integers(0, 256, 3 * 4096, dtype=np.uint8)
        probe[:4096] = 240
        if blosc_compressor(params)(probe) == bytes(codec.encode(probe)):
            return params
    except Exception:  # pragma: no cover - another numcodecs
        pass
    return None


def blosc_compressor(params: tuple | str) -> Callable[[np.ndarray], Any]:
    """``numcodecs.blosc.compress`` with :func:`_blosc_params`' parameters, called on the
    patch's own buffer (``codec.encode`` first checks and wraps its input, which costs
    about a third of LZ4's time on a 256-px patch); for an uncompressed array
    (``params == "raw"``, see :func:`shard_file_spec`) the patch's own bytes."""
    if params == _RAW:
        return _raw_row
    from numcodecs import blosc as nb

    cname, clevel, shuffle, blocksize, typesize = params
    cname = cname.encode()

    def encode(p: np.ndarray) -> bytes:
        return nb.compress(p, cname, clevel, shuffle, blocksize, typesize)

    return encode


def _blosc_encoder(codec) -> Callable[[np.ndarray], bytes]:
    """:func:`blosc_compressor` for ``codec`` when it encodes the same, else ``codec.encode``
    (``codec`` :data:`_RAW`: no compression)."""
    params = _blosc_params(codec)
    return codec.encode if params is None else blosc_compressor(params)


class BlockMarker:
    """``mark(b)``: set ``arr[b] = 1`` in a ``block_done`` array, on disk when it returns.

    A new store's array is raw bytes (no compression), one byte a block, so a mark is one
    byte written in place (``pwrite``) into its chunk file, which is created once, zeros,
    when the marker is made. That is safe without a temporary file: the array's bytes only
    ever change from 0 to 1, after the block's patches are in place, so whatever a crash
    leaves is a set of blocks that are all done. Nothing is created, replaced or freed
    while tiling runs; replacing a file frees its old blocks, and on a file system mounted
    with ``discard`` and no journal (this machine's) that waits for the disk, behind the
    patches being written back: 0.1-1 s, during which no new task would be handed out.
    Any other layout (stores from before 2026-11-30: one compressed chunk a block) is
    written through zarr.
    """

    def __init__(self, arr) -> None:
        self.arr = arr
        self._chunk_path = None
        try:
            from zarr.codecs import BytesCodec
            from zarr.storage import LocalStore

            md = arr.metadata
            if (md.zarr_format == 3 and isinstance(arr.store, LocalStore) and len(md.codecs) == 1
                    and isinstance(md.codecs[0], BytesCodec) and np.dtype(arr.dtype) == np.uint8 and arr.ndim == 1):
                root, key = os.path.join(str(arr.store.root), arr.path), md.chunk_key_encoding.encode_chunk_key
                self._k = int(md.chunk_grid.chunk_shape[0])
                self._chunk_path = lambda c: os.path.join(root, key((c,)))
        except Exception:  # pragma: no cover - another zarr
            self._chunk_path = None
        if self._chunk_path is not None:
            for c in range(-(-arr.shape[0] // self._k)):
                path = self._chunk_path(c)
                if not os.path.exists(path):  # an unwritten chunk: zarr's fill value, 0
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.partial"
                    with open(tmp, "wb") as f:
                        f.write(bytes(self._k))
                    os.replace(tmp, path)

    def mark(self, b: int) -> None:
        b = int(b)
        if not 0 <= b < self.arr.shape[0]:
            raise IndexError(f"block {b} is outside 0..{self.arr.shape[0] - 1}")
        if self._chunk_path is None:
            self.arr[b] = 1
            return
        fd = os.open(self._chunk_path(b // self._k), os.O_WRONLY | getattr(os, "O_BINARY", 0))
        try:
            os.pwrite(fd, b"\x01", b % self._k)
        finally:
            os.close(fd)

    __call__ = mark


def block_marker(arr) -> BlockMarker:
    """A :class:`BlockMarker` for a ``block_done`` array."""
    return BlockMarker(arr)


def blocks_done(arr) -> np.ndarray:
    """``arr[:] == 1`` for a ``block_done`` array, as bools.

    A new store's array is one chunk: one read through zarr. In the older layout (one
    chunk a block) only 1s are ever written and an unwritten chunk is
    absent (fill value 0, empty chunks not stored), so a block is done exactly when its
    chunk file exists: one small read a block instead of zarr's ~1 ms a chunk (each
    distinct file content is still decoded once through zarr). Any other layout is read
    through zarr.
    """
    try:
        import zarr
        from zarr.storage import LocalStore

        md = arr.metadata
        direct = (md.zarr_format == 3 and isinstance(arr.store, LocalStore) and tuple(md.chunk_grid.chunk_shape) == (1,)
                  and int(md.fill_value) == 0 and not zarr.config.get("array.write_empty_chunks"))
    except Exception:  # pragma: no cover - another zarr
        direct = False
    if direct:
        root, key = os.path.join(str(arr.store.root), arr.path), md.chunk_key_encoding.encode_chunk_key
        done = np.zeros(arr.shape[0], dtype=bool)
        first: dict[bytes, int] = {}  # each distinct chunk file, decoded once through zarr
        contents = []
        for b in range(arr.shape[0]):
            try:
                with open(os.path.join(root, key((b,))), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                contents.append(None)
                continue
            first.setdefault(raw, b)
            contents.append(raw)
        value = {raw: int(arr[b]) == 1 for raw, b in first.items()}
        done[:] = [c is not None and value[c] for c in contents]
        return done
    return np.asarray(arr[:]) == 1


def patch_reader(arr) -> Callable[[int], np.ndarray]:
    """``read(i) -> arr[i]`` for a (N, S, S, 3) uint8 patch array, the counterpart of :func:`patch_writer`:
    from the shard (:func:`shard_reader`) or the chunk file when the layout allows, else through zarr."""

    def through_zarr(i: int) -> np.ndarray:
        return np.asarray(arr[i])

    sharded = shard_reader(arr)  # a tiled store: patches in shard files
    if sharded is not None:
        return sharded
    try:
        from zarr.storage import LocalStore

        md = arr.metadata
        codec = _chunk_codec(md.codecs)
        ok = (md.zarr_format == 3 and isinstance(arr.store, LocalStore) and arr.dtype == np.uint8
              and tuple(md.chunk_grid.chunk_shape) == (1, *arr.shape[1:]) and codec is not None)
        if not ok:
            return through_zarr
        decode = _decoder(codec)
        key = md.chunk_key_encoding.encode_chunk_key
        root = os.path.join(str(arr.store.root), arr.path)
        shape, fill = tuple(arr.shape[1:]), int(md.fill_value)
        tail = (0,) * (arr.ndim - 1)
    except Exception:  # pragma: no cover - another zarr: use the public API
        return through_zarr

    def direct(i: int) -> np.ndarray:
        try:
            with open(os.path.join(root, key((i, *tail))), "rb") as f:
                raw = f.read()
        except FileNotFoundError:  # a chunk equal to the fill value is not stored
            return np.full(shape, fill, np.uint8)
        return np.frombuffer(decode(raw), dtype=np.uint8).reshape(shape)

    return direct


def slide_id_from_path(path: str | Path) -> str:
    stem = Path(path).name
    for ext in (".ome.zarr", ".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    else:
        stem = Path(stem).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "slide"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("napari-protodiff", "zarr", "numpy", "dask", "tifffile", "openslide-python", "openslide-bin", "scikit-image"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SlideEntry:
    """One slide's group in a store."""

    store: "PatchStore"
    slide_id: str

    @property
    def group(self):
        return self.store.root["slides"][self.slide_id]

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs.get("protodiff", {}))

    @property
    def status(self) -> str:
        return self.attrs.get("status", "unknown")

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def n_patches(self) -> int:
        return int(self.group["coords"].shape[0])

    def patches(self):
        """Lazy (N, S, S, 3) uint8 dask array of this slide's patches (a dask chunk per zarr
        shard in a sharded store: zarr reads a whole shard much faster than its patches one by one)."""
        import dask.array as da

        arr = self.group["patches"]
        shards = getattr(arr, "shards", None)
        return da.from_zarr(arr, chunks=shards) if shards else da.from_zarr(arr)

    def coords(self) -> np.ndarray:
        return np.asarray(self.group["coords"][:])

    def tissue_fraction(self) -> np.ndarray:
        return np.asarray(self.group["tissue_fraction"][:])

    def blocks_done(self) -> np.ndarray:
        return blocks_done(self.group["block_done"])


class PatchStore:
    """A patch store on disk (see the module docstring for its layout)."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").exists() and not (self.path / ".zgroup").exists():
            raise StoreError(f"{self.path}: not a patch store (no zarr group there).")
        try:
            self.root = zarr.open_group(str(self.path), mode=mode)
        except Exception as exc:
            raise StoreError(f"{self.path}: cannot open the patch store ({exc}).") from exc
        meta = self.meta
        if meta.get("kind") != STORE_KIND:
            raise StoreError(f"{self.path}: a zarr group but not a protodiff patch store.")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format {meta.get('format_version')} is newer than this protodiff reads "
                f"({FORMAT_VERSION}); upgrade napari-protodiff."
            )

    # -- creation --------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, patch_size: int, mpp: float) -> "PatchStore":
        import zarr

        p = Path(path)
        root = zarr.open_group(str(p), mode="w-", zarr_format=3)
        root.attrs["protodiff"] = {
            "kind": STORE_KIND,
            "format_version": FORMAT_VERSION,
            "patch_size": int(patch_size),
            "mpp": float(mpp),
            "slides": [],
            "created": now(),
            "versions": versions(),
        }
        root.create_group("slides")
        return cls(p, mode="r+")

    @staticmethod
    def is_store(path: str | Path) -> bool:
        try:
            PatchStore(path)
            return True
        except StoreError:
            return False

    # -- metadata --------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.root.attrs.get("protodiff", {}))

    def _set_meta(self, **updates: Any) -> None:
        meta = self.meta
        meta.update(updates)
        self.root.attrs["protodiff"] = meta

    @property
    def patch_size(self) -> int:
        return int(self.meta["patch_size"])

    @property
    def mpp(self) -> float:
        return float(self.meta["mpp"])

    @property
    def slide_ids(self) -> list[str]:
        """All slides in the store, complete or not, in the order they were added."""
        return list(self.meta.get("slides", []))

    def slide(self, slide_id: str) -> SlideEntry:
        if slide_id not in self.slide_ids:
            raise StoreError(f"{self.path}: no slide '{slide_id}' in this store (it has {', '.join(self.slide_ids) or 'none'}).")
        return SlideEntry(self, slide_id)

    def slides(self, complete_only: bool = True) -> list[SlideEntry]:
        entries = [SlideEntry(self, s) for s in self.slide_ids]
        return [e for e in entries if e.complete] if complete_only else entries

    def find_by_hash(self, content_hash: str) -> SlideEntry | None:
        for e in self.slides(complete_only=False):
            if e.attrs.get("content_hash") == content_hash:
                return e
        return None

    def unique_slide_id(self, wanted: str) -> str:
        taken = set(self.slide_ids)
        if wanted not in taken:
            return wanted
        i = 2
        while f"{wanted}-{i}" in taken:
            i += 1
        return f"{wanted}-{i}"

    # -- slides ----------------------------------------------------------------------
    def add_slide(self, slide_id: str, attrs: dict[str, Any], coords: np.ndarray, tissue_fraction: np.ndarray,
                  block_start: np.ndarray, shard_patches: int = 1, compression: str = "none") -> SlideEntry:
        """Create a slide's group and arrays (status "tiling"); patches are written later.

        ``shard_patches`` > 1: the patches (still one chunk each) are kept in shard files
        of that many consecutive patches (zarr sharding): far fewer files, and a whole
        shard is written at once. ``compression``: one of :data:`COMPRESSIONS` (see
        :func:`patch_compressors`)."""
        compressors = patch_compressors(compression)  # an unknown name fails before anything is made
        n, s = int(coords.shape[0]), self.patch_size
        g = self.root["slides"].create_group(slide_id)
        g.attrs["protodiff"] = dict(attrs, status="tiling", n_patches=n, started=now())
        shards = None if shard_patches <= 1 else (int(shard_patches), s, s, 3)
        g.create_array("patches", shape=(n, s, s, 3), chunks=(1, s, s, 3), shards=shards, dtype="uint8",
                       compressors=compressors, fill_value=0, dimension_names=("patch", "y", "x", "c"),
                       chunk_key_encoding=PATCH_CHUNK_KEYS)
        g.create_array("coords", data=coords.astype(np.int64), chunks=(max(1, min(n, 65536)), 2),
                       dimension_names=("patch", "xy"))
        g.create_array("tissue_fraction", data=tissue_fraction.astype(np.float32), chunks=(max(1, min(n, 65536)),),
                       dimension_names=("patch",))
        g.create_array("block_start", data=block_start.astype(np.int64), chunks=(max(1, block_start.shape[0]),))
        nb = int(block_start.shape[0] - 1)
        # raw bytes in one chunk, marked in place (see BlockMarker), not a compressed chunk a block
        g.create_array("block_done", shape=(nb,), chunks=(max(1, min(nb, BLOCK_DONE_CHUNK)),), dtype="uint8",
                       fill_value=0, compressors=None)
        self._set_meta(slides=self.slide_ids + [slide_id])
        return SlideEntry(self, slide_id)

    def mark_complete(self, slide_id: str) -> None:
        e = self.slide(slide_id)
        if not e.blocks_done().all():
            raise StoreError(f"{self.path}: slide '{slide_id}' still has unwritten blocks.")
        g = e.group
        g.attrs["protodiff"] = dict(e.attrs, status="complete", finished=now())

    def set_slide_attrs(self, slide_id: str, **updates: Any) -> None:
        """Update a slide's provenance attributes."""
        e = self.slide(slide_id)
        e.group.attrs["protodiff"] = dict(e.attrs, **updates)

    def remove_slide(self, slide_id: str) -> None:
        if slide_id in self.slide_ids:
            self._set_meta(slides=[s for s in self.slide_ids if s != slide_id])
        shutil.rmtree(self.path / "slides" / slide_id, ignore_errors=True)

    # -- whole-store views ---------------------------------------------------------------
    def patches(self):
        """All complete slides' patches as one lazy dask array, in ``slide_ids`` order."""
        import dask.array as da

        parts = [e.patches() for e in self.slides()]
        if not parts:
            raise StoreError(f"{self.path}: the store has no completely tiled slide.")
        return da.concatenate(parts, axis=0)

    def patch_table(self):
        """(slide_id per patch, coords (N, 2)) for all complete slides, in store order."""
        ids, coords = [], []
        for e in self.slides():
            c = e.coords()
            coords.append(c)
            ids.extend([e.slide_id] * len(c))
        if not coords:
            return np.array([], dtype=object), np.zeros((0, 2), np.int64)
        return np.array(ids, dtype=object), np.concatenate(coords)

    def summary(self) -> dict[str, Any]:
        out = {"path": str(self.path), "patch_size": self.patch_size, "mpp": self.mpp, "slides": []}
        for e in self.slides(complete_only=False):
            a = e.attrs
            out["slides"].append({"slide_id": e.slide_id, "status": e.status, "n_patches": e.n_patches,
                                  "path": a.get("path"), "patch_mpp": a.get("patch_mpp")})
        out["n_patches"] = sum(s["n_patches"] for s in out["slides"] if s["status"] == "complete")
        return out
