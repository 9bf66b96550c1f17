"""Tile slides into a patch store: plan (tissue + grid), then read and write blocks in parallel.

Everything that can fail on bad input (opening, pixel size, tissue, grid) is checked
for *all* slides before anything is written. Each block of patches is written by one
task (a whole shard file, or one zarr call) and marked done by this process once the
task has returned, so an interrupted run resumes exactly where it stopped: no patch
duplicated, none missing.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ProtodiffError, SlideError, StoreError
from .executor import release_warm, run_tasks, warm_up
from .grid import GridPlan, iter_block, plan_grid, read_block
from .interrupts import signal_received
from .progress import CancelToken, Progress
from .slide import CONTENT_HASH, Slide, check_mpp_value, hash_algorithm, open_slide
from .store import (COMPRESSIONS, PatchStore, block_marker, blosc_compressor, patch_writer, raw_shard_nbytes,
                    shard_file_spec, slide_id_from_path, versions, write_shard_file)
from .tissue import TissueMask, TissueParams, detect_tissue


#: The default shard never holds more patches than this (tiny patches: progress and cancel stay fine-grained).
MAX_SHARD_PATCHES = 4096


class TilingConfig(BaseModel):
    """Parameters of the tiling stage (shared by the API, ``protodiff tile`` and the Slides widget)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(256, ge=8, le=4096, description="Patch side in pixels.")
    mpp: float = Field(0.5, gt=0, description="Patch resolution in µm/px.")
    min_tissue: float = Field(0.5, ge=0, le=1, description="Minimum tissue fraction of a kept patch.")
    mpp_override: float | None = Field(None, description="Level-0 pixel size (µm/px) to use instead of the file's.")
    overwrite: bool = Field(False, description="Re-tile slides already in the store.")
    workers: int = Field(1, ge=1, le=512, description="Parallel local worker processes.")
    scheduler: str | None = Field(None, description="Address of an existing dask.distributed scheduler.")
    block_px: int = Field(2048, ge=64, description="Side of a block read at once (px at the read level).")
    shard_patches: int | None = Field(
        None, ge=1, le=65536,
        description="Patches per shard file of the store (default: a block's worth, (block_px // size)², at most "
                    f"{MAX_SHARD_PATCHES}; 1: one file per patch). A shard is the unit of parallel work and of resume.")
    compression: Literal[COMPRESSIONS] = Field(
        "none", description="Lossless compression of the stored patches: none (raw bytes, fastest to write and read), "
                            "lz4 (saves 0-9 % on H&E tissue) or zstd (5-19 %, for about as much CPU as decoding the "
                            "slide). A slide that is resumed keeps the compression it was started with.")
    tissue: TissueParams = Field(default_factory=TissueParams)

    @field_validator("mpp")
    @classmethod
    def _plausible_mpp(cls, v: float) -> float:
        check_mpp_value(v, "target resolution")
        return v

    @field_validator("mpp_override")
    @classmethod
    def _plausible_override(cls, v: float | None) -> float | None:
        return None if v is None else check_mpp_value(v, "mpp override")


@dataclass
class SlidePlan:
    path: Path
    slide: Slide
    slide_id: str
    hashing: "_Hashing"
    tissue: TissueMask
    grid: GridPlan
    action: str = "new"  # new | resume | skip | overwrite
    blocks_todo: list[int] = field(default_factory=list)
    shard_patches: int = 1
    content_hash: str | None = None
    """Known once it was needed or the hash finished (before the slide is marked complete)."""
    other_hashes: dict[str, str] = field(default_factory=dict)
    """The slide's hash in older algorithms, computed only to compare with an older store."""
    hash_recorded: bool = False
    hash_writer: "_InThread | None" = None
    """The thread writing the hash into the slide's attributes while tiling runs."""

    @property
    def fingerprint(self) -> tuple[int, tuple[int, int]]:
        """(content bytes, dimensions): equal for equal content, so a cheap pre-check of the hash."""
        return self.hashing.nbytes, tuple(self.slide.info.dimensions)

    def wait_hash(self) -> str:
        if self.content_hash is None:
            self.content_hash = self.hashing.result()
        return self.content_hash

    def hash_as(self, recorded: str | None) -> str | None:
        """This slide's hash in the algorithm of a ``recorded`` one (a store from before
        XXH3 holds SHA-256 hashes), to compare with it; ``None`` for an unknown algorithm."""
        algo = hash_algorithm(recorded)
        if algo is None:
            return None
        if algo == CONTENT_HASH:
            return self.wait_hash()
        if algo not in self.other_hashes:
            self.other_hashes[algo] = self.slide.content_hash(algo)
        return self.other_hashes[algo]

    @property
    def block_start(self) -> np.ndarray:
        """Offsets of the store's blocks (the units written and marked done): one per shard
        when sharded, else the grid's spatial blocks."""
        if self.shard_patches <= 1:
            return self.grid.block_start
        n = self.grid.n_patches
        return np.r_[np.arange(0, n, self.shard_patches), n].astype(np.int64)


@dataclass
class TilingResult:
    store: str
    slides: list[dict[str, Any]]
    seconds: float
    patches_written: int

    @property
    def patches_per_second(self) -> float:
        return self.patches_written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "slides": self.slides, "seconds": round(self.seconds, 3),
                "patches_written": self.patches_written, "patches_per_second": round(self.patches_per_second, 1)}


def plan_slide(path: str | os.PathLike, config: TilingConfig) -> tuple[Slide, TissueMask, GridPlan]:
    """Open a slide, detect tissue and lay the grid; raises a one-sentence error on bad input."""
    slide = open_slide(path, mpp_override=config.mpp_override)
    slide.require_mpp()
    return (slide, *_tissue_and_grid(slide, config))


def _tissue_and_grid(slide: Slide, config: TilingConfig) -> tuple[TissueMask, GridPlan]:
    mask = detect_tissue(slide, config.tissue)
    if not mask.mask.any():
        raise SlideError(f"{slide.path}: no tissue found (the slide looks blank at {mask.mpp or 0:.3g} µm/px).")
    grid = plan_grid(slide, mask, config.size, config.mpp, config.min_tissue, config.block_px)
    if grid.n_patches == 0:
        raise SlideError(
            f"{slide.path}: no {config.size}-px patch at {config.mpp:g} µm/px has at least "
            f"{config.min_tissue:.0%} tissue; lower --min-tissue or check the slide."
        )
    return mask, grid


class _InThread:
    """``fn(*args, **kwargs)`` in a daemon thread (it never holds up the exit): :meth:`result`
    waits for its value and raises its error."""

    def __init__(self, name: str, fn, *args, **kwargs) -> None:
        import threading

        self._out: dict[str, Any] = {}

        def run() -> None:
            try:
                self._out["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # raised by result()
                self._out["error"] = exc

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]


class _Hashing(_InThread):
    """A slide's content hash computed in a thread (reading the whole file, GIL-free), so that
    it overlaps tissue detection and, when no decision needs it, the tiling itself (a slow
    or remote file does not hold up the start)."""

    def __init__(self, slide: Slide) -> None:
        self.nbytes, self.mtime_ns = slide.content_stat()
        super().__init__("protodiff-hash", slide.content_hash)


def _plan_and_hash(path: str | os.PathLike, config: TilingConfig) -> tuple[Slide, TissueMask, GridPlan, _Hashing]:
    """:func:`plan_slide`, with the slide's content hash started in a thread beside it. A
    planning error is raised as is, without waiting for the hash."""
    slide = open_slide(path, mpp_override=config.mpp_override)
    slide.require_mpp()
    try:
        hashing = _Hashing(slide)
        mask, grid = _tissue_and_grid(slide, config)
    except BaseException:
        slide.close()
        raise
    return slide, mask, grid, hashing


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is a file, not a patch store.")
    if out.exists() and any(out.iterdir()) and not PatchStore.is_store(out):
        raise StoreError(f"{out}: exists and is not a patch store; choose another output.")
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StoreError(f"{out}: cannot create the store there ({parent} is a file, not a folder).")
    # A real probe, not os.access: root passes permission checks but not read-only mounts.
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise StoreError(f"{out}: cannot write there ({exc.strerror or exc} in {parent}).") from None


# -- the unit of parallel work (module level so dask can pickle it) -------------------------
#: What :func:`tile_block` imports lazily, imported once before the workers start (by the
#: process they fork from, see :func:`~napari_protodiff.core.executor.warm_up`). Not zarr: a sharded store's shard files are written from a plain spec (zarr's import
#: alone costs each worker server about a second of CPU, while the slides are planned).
WORKER_PRELOAD = ("numcodecs.blosc", "google_crc32c", "tifffile", "imagecodecs", "openslide")


@lru_cache(maxsize=8)
def _worker_slide(path: str, mpp_override: float | None) -> Slide:
    return open_slide(path, mpp_override=mpp_override)


@lru_cache(maxsize=32)
def _worker_patch_writer(store: str, slide_id: str):
    import zarr

    g = zarr.open_group(os.path.join(store, "slides", slide_id), mode="r+")
    return patch_writer(g["patches"])


def _compressor(params: Sequence | str):
    """The chunk encoder of a shard spec's ``blosc`` entry (``"raw"``, or Blosc parameters,
    which may arrive as a list after pickling), made once a process."""
    return _encoder(params if isinstance(params, str) else tuple(params))


@lru_cache(maxsize=8)
def _encoder(params: tuple | str):
    return blosc_compressor(params)


def shard_size(cfg: TilingConfig) -> int:
    """Patches per shard file (``cfg.shard_patches``, by default a block's worth)."""
    if cfg.shard_patches is not None:
        return int(cfg.shard_patches)
    return min(MAX_SHARD_PATCHES, max(1, cfg.block_px // cfg.size) ** 2)


def tile_block(task: dict[str, Any]) -> tuple[str, int, int]:
    """Read one block of patches from its slide and write it to the store.

    A store block (a shard) can span several of the grid's spatial blocks; each of those
    parts is read on its own, so a slide read by regions never reads a bounding box
    that spans the gap between two blocks. A shard is written straight to its file
    (``task["shard_file"]``, see :func:`~napari_protodiff.core.store.shard_file_spec`);
    any other layout through zarr. The caller marks the block done once this returns."""
    slide = _worker_slide(task["path"], task["mpp_override"])
    s, e = task["start"], task["stop"]
    coords, parts = task["coords"], task["parts"]
    args = (slide, task["level"], task["lds"], task["read_size"], task["size"])
    shard = task.get("shard_file")
    if shard is not None:
        # Patch by patch: each is decoded and written out while it is still in the cache.
        rows = (p.reshape(-1) for a, b in zip(parts[:-1], parts[1:]) for p in iter_block(*args, coords[a:b]))
        write_shard_file(shard["path"], rows, shard["k"], shard["fill"], _compressor(shard["blosc"]),
                         raw_shard_nbytes(shard, e - s, task["size"] ** 2 * 3))
    else:
        reads = [read_block(*args, coords[a:b]) for a, b in zip(parts[:-1], parts[1:])]
        _worker_patch_writer(task["store"], task["slide_id"])(s, reads)  # the parts in order, not joined
    return task["slide_id"], task["block"], e - s


def tile_slides(
    paths: Sequence[str | os.PathLike],
    store: str | os.PathLike,
    config: TilingConfig | None = None,
    cancel: CancelToken | None = None,
) -> Iterator[Progress]:
    """Tile ``paths`` into the patch store at ``store``; a generator of progress events.

    Returns (``StopIteration.value``) a :class:`TilingResult`. Use
    :func:`napari_protodiff.core.progress.drain` to run it without watching.
    """
    try:
        return (yield from _tile_slides(paths, store, config, cancel))
    finally:
        release_warm()  # worker processes started for tasks that never came (bad input, nothing to do)


def _tile_slides(paths, store, config, cancel) -> Iterator[Progress]:
    cfg = config or TilingConfig()
    out = Path(store)
    if not paths:
        raise ProtodiffError("No slide given to tile.")
    _check_output(out)
    # worker processes (and what they import) start while we plan
    warm_up(tile_block, workers=cfg.workers, scheduler=cfg.scheduler, preload=WORKER_PRELOAD)

    # 1. plan every slide before writing anything
    plans: list[SlidePlan] = []
    k = shard_size(cfg)
    for i, p in enumerate(paths):
        if cancel is not None:
            cancel.raise_if_cancelled()
        yield Progress(0, 0, f"planning {Path(p).name} ({i + 1}/{len(paths)})")
        slide, mask, grid, hashing = _plan_and_hash(p, cfg)
        plans.append(SlidePlan(Path(p), slide, slide_id_from_path(p), hashing, mask, grid, shard_patches=k))
    # The same slide given twice? Only slides of equal size and dimensions can be: their
    # hashes are compared now; any other slide's hash is not waited for.
    for i, sp in enumerate(plans):
        for other in plans[:i]:
            if sp.fingerprint == other.fingerprint and sp.wait_hash() == other.wait_hash():
                raise SlideError(f"{sp.path}: the same slide as {other.path} (identical content) is given twice.")

    # 2. decide what to do with the store and each slide
    created = False
    if out.exists() and PatchStore.is_store(out):
        st = PatchStore(out, mode="r+")
        if st.patch_size != cfg.size or abs(st.mpp - cfg.mpp) > 1e-9:
            if not cfg.overwrite:
                raise StoreError(
                    f"{out}: the store holds {st.patch_size}-px patches at {st.mpp:g} µm/px, not {cfg.size} px at "
                    f"{cfg.mpp:g} µm/px; use another store (or --overwrite to replace the whole store)."
                )
            shutil.rmtree(out)
            st, created = PatchStore.create(out, cfg.size, cfg.mpp), True
    else:
        if out.exists():
            out.rmdir()  # an empty folder
        st, created = PatchStore.create(out, cfg.size, cfg.mpp), True

    new_ids: list[str] = []
    try:
        for sp in plans:
            existing = _in_store(st, sp)
            if existing is not None and existing.complete and not cfg.overwrite:
                sp.action, sp.slide_id = "skip", existing.slide_id
                continue
            if existing is not None and not existing.complete and not cfg.overwrite:
                same = existing.attrs.get("grid_key") == _grid_key(sp, cfg)
                if same:
                    sp.action, sp.slide_id = "resume", existing.slide_id
                    sp.blocks_todo = [int(b) for b in np.flatnonzero(~existing.blocks_done())]
                    # a shard (or zarr metadata) being written when the run was killed
                    for f in (out / "slides" / existing.slide_id).rglob("*.partial"):
                        f.unlink(missing_ok=True)
                    continue
                raise StoreError(
                    f"{out}: slide '{existing.slide_id}' was partly tiled with other parameters; "
                    "re-tile it with --overwrite."
                )
            if existing is not None:
                sp.action = "overwrite"
                st.remove_slide(existing.slide_id)
                sp.slide_id = st.unique_slide_id(existing.slide_id)
            else:
                sp.slide_id = st.unique_slide_id(sp.slide_id)
            st.add_slide(sp.slide_id, _slide_attrs(sp, cfg), sp.grid.coords, sp.grid.tissue_fraction,
                         sp.block_start, shard_patches=sp.shard_patches, compression=cfg.compression)
            new_ids.append(sp.slide_id)
            sp.blocks_todo = list(range(len(sp.block_start) - 1))

        # 3. read and write blocks in parallel
        tasks, markers = [], {}
        for sp in plans:
            if not sp.blocks_todo:
                continue
            g = st.slide(sp.slide_id).group
            markers[sp.slide_id] = block_marker(g["block_done"])
            spec = shard_file_spec(g["patches"]) if sp.shard_patches > 1 else None
            common = {"path": str(sp.path.resolve()), "mpp_override": cfg.mpp_override, "store": str(out.resolve()),
                      "slide_id": sp.slide_id, "level": sp.grid.level, "lds": sp.grid.level_downsample,
                      "read_size": sp.grid.read_size, "size": sp.grid.patch_size}  # (paths resolved once a slide)
            tasks += [_task(sp, b, common, spec) for b in sp.blocks_todo]
        total = sum(t["stop"] - t["start"] for t in tasks)
        done = 0
        t0 = time.perf_counter()
        yield Progress(0, total, f"tiling {len(tasks)} blocks from {len(plans)} slide(s)")
        for sid, b, n in run_tasks(tile_block, tasks, workers=cfg.workers, scheduler=cfg.scheduler, cancel=cancel,
                                   preload=WORKER_PRELOAD):
            markers[sid](b)  # the block's patches are in their files: it counts as done
            done += n
            _record_hashes(st, plans, wait=False)
            rate = done / max(1e-9, time.perf_counter() - t0)
            yield Progress(done, total, f"{done}/{total} patches", {"patches_per_second": rate})
        seconds = time.perf_counter() - t0
        _record_hashes(st, plans, wait=True)
        for sp in plans:
            if sp.action != "skip":
                st.mark_complete(sp.slide_id)
    except BaseException:
        # Errors (not interruptions) leave no half-written slide behind: a new slide's
        # group is removed, and a store this run created is removed if nothing is left.
        # A cancelled or killed run keeps its blocks (status "tiling") so it can resume.
        import sys

        exc = sys.exc_info()[1]
        try:  # nothing may write into a slide's group while it is removed (or after the run)
            _join_writers(plans)
        except Exception:  # pragma: no cover - the run's own error is the one to report
            pass
        # (a signal counts even when another error came first: SIGTERM sent to the whole
        # process group also ends the workers, and their broken pool may be reported first)
        interrupted = (isinstance(exc, (KeyboardInterrupt, GeneratorExit)) or type(exc).__name__ == "Cancelled"
                       or signal_received() is not None)
        if not interrupted:
            for sid in new_ids:
                st.remove_slide(sid)
            if created and not st.slide_ids:
                shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        for sp in plans:
            sp.slide.close()
        _worker_slide.cache_clear()
        _worker_patch_writer.cache_clear()

    slides_out = []
    for sp in plans:
        slides_out.append({
            "slide_id": sp.slide_id, "path": str(sp.path), "action": sp.action,
            "n_patches": sp.grid.n_patches, "level": sp.grid.level, "patch_mpp": sp.grid.patch_mpp,
            "resampled": sp.grid.resampled, "tissue_fraction": round(sp.tissue.tissue_fraction, 4),
        })
    return TilingResult(str(out), slides_out, seconds, done)


def _in_store(st: PatchStore, sp: SlidePlan):
    """The store's slide (complete or not) with ``sp``'s content, or ``None``; each slide's
    attributes are read once.

    Only a slide of the same dimensions and, where recorded, the same size can have it:
    with none, ``sp``'s hash is not waited for. A run stopped before its slide's hash was
    recorded (the hash is written once known, while the patches are) leaves a partial
    slide that no hash can match: it is this slide's if it was read from the same path,
    with the same size and modification time, and is resumed; a partial slide of this
    path whose file has changed since is dropped."""
    nbytes, dims = sp.fingerprint
    entries = [(e, e.attrs) for e in st.slides(complete_only=False)]
    same = [(e, a) for e, a in entries
            if tuple(a.get("dimensions") or ()) == dims and a.get("content_bytes", nbytes) == nbytes]
    if not same:
        return None
    for e, a in same:
        recorded = a.get("content_hash")
        if recorded is not None and sp.hash_as(recorded) == recorded:
            return e
    found = None
    for e, a in entries:
        if a.get("status") == "complete" or a.get("content_hash") is not None or a.get("path") != str(sp.path.resolve()):
            continue
        if found is None and a.get("content_bytes") == nbytes and a.get("content_mtime_ns") == sp.hashing.mtime_ns:
            found = e
        else:
            st.remove_slide(e.slide_id)
    return found


def _record_hashes(st: PatchStore, plans: list[SlidePlan], wait: bool) -> None:
    """Write each new slide's content hash into its attributes once it is known.

    While tiling runs (``wait=False``) the write happens in a thread: it replaces the
    group's ``zarr.json``, which can wait for the disk (see ``store.BlockMarker``), and
    the loop handing out tasks must not. ``wait=True`` waits for every hash and write (a
    slide is marked complete only after)."""
    for sp in plans:
        if sp.action == "skip" or sp.hash_recorded:
            continue
        if sp.content_hash is None and not (wait or sp.hashing.done()):
            continue
        sp.hash_recorded = True
        if wait:
            st.set_slide_attrs(sp.slide_id, content_hash=sp.wait_hash())
        else:
            sp.hash_writer = _InThread("protodiff-attrs", st.set_slide_attrs, sp.slide_id, content_hash=sp.wait_hash())
    if wait:
        _join_writers(plans)


def _join_writers(plans: list[SlidePlan]) -> None:
    """Wait for every slide's attribute write still running (and raise its error)."""
    for sp in plans:
        w, sp.hash_writer = sp.hash_writer, None
        if w is not None:
            w.result()


def _grid_key(sp: SlidePlan, cfg: TilingConfig) -> str:
    g = sp.grid
    key = f"{cfg.size}|{cfg.mpp}|{cfg.min_tissue}|{g.level}|{g.read_size}|{g.n_patches}|{g.n_blocks}|{cfg.block_px}"
    return key if sp.shard_patches <= 1 else f"{key}|shards {sp.shard_patches}"


def _slide_attrs(sp: SlidePlan, cfg: TilingConfig) -> dict[str, Any]:
    info, g = sp.slide.info, sp.grid
    return {
        "path": str(sp.path.resolve()),
        "content_hash": sp.content_hash,
        "content_bytes": sp.hashing.nbytes,
        "content_mtime_ns": sp.hashing.mtime_ns,
        "backend": info.backend,
        "vendor": info.vendor,
        "dimensions": list(info.dimensions),
        "slide_mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "mpp_reported": list(info.mpp_reported) if info.mpp_reported else None,
        "objective_power": info.objective_power,
        "level": g.level,
        "level_downsample": g.level_downsample,
        "read_size": g.read_size,
        "resampled": g.resampled,
        "patch_size": g.patch_size,
        "patch_mpp": g.patch_mpp,
        "footprint_level0": g.footprint,
        "grid_shape": list(g.grid_shape),
        "tissue_mask": {"downsample": sp.tissue.downsample, "mpp": sp.tissue.mpp,
                        "tissue_fraction": sp.tissue.tissue_fraction},
        "params": cfg.model_dump(mode="json", exclude={"workers", "scheduler", "overwrite"}),
        "grid_key": _grid_key(sp, cfg),
        "shard_patches": sp.shard_patches,
        "versions": versions(),
    }


def _task(sp: SlidePlan, b: int, common: dict[str, Any], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Block ``b`` of ``sp`` as a task for :func:`tile_block`; ``common``: the slide's keys
    shared by its tasks (path, mpp_override, store, slide_id, level, lds, read_size, size)."""
    s, e = int(sp.block_start[b]), int(sp.block_start[b + 1])
    # the grid's spatial blocks inside [s, e), as offsets from s: each is read on its own
    inner = sp.grid.block_start[(sp.grid.block_start > s) & (sp.grid.block_start < e)]
    parts = np.r_[0, inner - s, e - s].astype(np.int64)
    task = dict(common, block=b, start=s, stop=e, coords=sp.grid.coords[s:e], parts=parts)
    if spec is not None and s % spec["k"] == 0 and (e - s == spec["k"] or e == spec["n"]):  # one whole shard
        task["shard_file"] = {"path": os.path.join(spec["root"], spec["keys"][s // spec["k"]]), "k": spec["k"],
                              "fill": spec["fill"], "blosc": spec["blosc"]}
    return task
