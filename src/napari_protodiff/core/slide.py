"""Whole-slide images as lazy multiscale pyramids with physical metadata.

``open_slide(path)`` picks a backend by file type (one module each under
:mod:`.backends`), reads the pyramid's level sizes, tile sizes and metadata, and checks
the pixel size. A slide whose pixel size (µm/px, "mpp") is missing or implausible is
*reported* (``SlideInfo.mpp_problem``) and can be overridden; it is never guessed.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SlideError

#: The content hash of new slides: XXH3-128 (xxhash). It runs at the speed of reading the
#: file, several times faster than SHA-256 (docs/benchmarks.md), and at 128 bits two
#: different slides match by chance no more often. (It identifies content against
#: accidents, not forgery, which no decision here needs.)
CONTENT_HASH = "xxh3-128"
#: Algorithms a store may hold a slide's hash in (stores before 2026-11-30: SHA-256).
HASH_ALGORITHMS = ("xxh3-128", "sha256")

#: Pixel sizes outside this range (µm/px) are not plausible for a microscope slide scan.
MPP_PLAUSIBLE = (0.05, 50.0)
#: Nor is a slide wider than this (mm).
MAX_EXTENT_MM = 250.0

OPENSLIDE_EXTENSIONS = {".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".svslide", ".bif", ".dcm"}
TIFF_EXTENSIONS = {".tif", ".tiff", ".btf", ".tf8", ".tf2"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}
ZARR_EXTENSIONS = {".zarr"}
SUPPORTED_EXTENSIONS = OPENSLIDE_EXTENSIONS | TIFF_EXTENSIONS | IMAGE_EXTENSIONS | ZARR_EXTENSIONS


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: size in pixels, downsample from level 0, native tile size."""

    width: int
    height: int
    downsample: float
    tile_width: int
    tile_height: int


@dataclass
class SlideInfo:
    """Everything a user (or a later stage) needs to know about a slide."""

    path: str
    backend: str
    vendor: str | None
    levels: list[LevelInfo]
    mpp: float | None
    """Pixel size at level 0 (µm/px) that this package uses: the metadata's if plausible,
    else the override; ``None`` when neither is available."""
    mpp_source: str | None
    """``"metadata"``, ``"override"`` or ``None``."""
    mpp_reported: tuple[float, float] | None
    """What the file itself says (x, y) in µm/px, even when implausible."""
    mpp_problem: str | None
    """Why the reported pixel size was not used, if it was not."""
    objective_power: float | None
    associated_images: list[str] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.levels[level].downsample

    def to_dict(self, with_properties: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["dimensions"] = list(self.dimensions)
        d["levels"] = [
            dict(asdict(lv), index=i, mpp=self.level_mpp(i)) for i, lv in enumerate(self.levels)
        ]
        if not with_properties:
            d.pop("properties")
        return d


def mpp_problem(mpp_x: float | None, mpp_y: float | None, width: int, height: int) -> str | None:
    """Return why a reported pixel size cannot be trusted, or ``None`` if it is fine."""
    if mpp_x is None or mpp_y is None:
        return "the file does not record its pixel size (µm/px)"
    for v in (mpp_x, mpp_y):
        if not math.isfinite(v) or v <= 0:
            return f"the file records an invalid pixel size ({v!r} µm/px)"
    lo, hi = MPP_PLAUSIBLE
    if not (lo <= mpp_x <= hi and lo <= mpp_y <= hi):
        return (
            f"the file claims {mpp_x:.4g} x {mpp_y:.4g} µm/px, outside the plausible range "
            f"{lo:g}-{hi:g} µm/px for a slide scan"
        )
    extent_mm = max(width * mpp_x, height * mpp_y) / 1000
    if extent_mm > MAX_EXTENT_MM:
        return f"the file's pixel size would make the slide {extent_mm:.0f} mm wide, which is implausible"
    if abs(mpp_x - mpp_y) / max(mpp_x, mpp_y) > 0.05:
        return f"the file claims non-square pixels ({mpp_x:.4g} x {mpp_y:.4g} µm/px)"
    return None


def check_mpp_value(mpp: float, what: str = "pixel size") -> float:
    """Validate a user-given pixel size; raise a one-sentence error if absurd."""
    lo, hi = MPP_PLAUSIBLE
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and lo <= mpp <= hi):
        raise SlideError(f"The {what} {mpp!r} µm/px is not plausible; give a value between {lo:g} and {hi:g}.")
    return float(mpp)


def _backend_for(path: Path) -> str:
    suffixes = "".join(path.suffixes[-2:]).lower()
    ext = path.suffix.lower()
    if path.is_dir() and next(path.glob("*.dcm"), None) is not None:
        return "openslide"  # a DICOM WSI series folder
    if path.is_dir() or ext in ZARR_EXTENSIONS or suffixes.endswith(".zarr"):
        return "omezarr"
    if ext in OPENSLIDE_EXTENSIONS:
        return "openslide"
    if ext in TIFF_EXTENSIONS:
        # Vendor TIFF variants (Philips, Ventana, Leica, Aperio) need OpenSlide's
        # metadata; generic and OME pyramidal TIFF go through tifffile's fast path.
        from .backends.openslide_backend import detect_vendor

        vendor = detect_vendor(path)
        if vendor not in (None, "generic-tiff"):
            return "openslide"
        return "tiff"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    raise SlideError(
        f"{path}: unknown slide type '{ext or path.name}'; supported are "
        + ", ".join(sorted(SUPPORTED_EXTENSIONS))
        + "."
    )


class Slide:
    """An open slide: metadata, lazy pyramid and region reads.

    Picklable (it re-opens the file), so it can be shipped to dask workers.
    """

    def __init__(self, path: str | os.PathLike, mpp_override: float | None = None) -> None:
        p = Path(path)
        if not p.exists():
            raise SlideError(f"{p}: no such file.")
        if p.is_file() and p.stat().st_size == 0:
            raise SlideError(f"{p}: the file is empty (0 bytes).")
        self.path = p
        self.mpp_override = None if mpp_override is None else check_mpp_value(mpp_override, "mpp override")
        kind = _backend_for(p)
        self._backend = _make_backend(kind, p)
        self.info = self._make_info()

    # -- construction -------------------------------------------------------------
    def _make_info(self) -> SlideInfo:
        b = self._backend
        levels = b.levels()
        meta = b.metadata()
        w, h = levels[0].width, levels[0].height
        mx, my = meta.get("mpp_x"), meta.get("mpp_y")
        reported = (float(mx), float(my)) if mx is not None and my is not None else None
        problem = mpp_problem(mx, my, w, h)
        if self.mpp_override is not None:
            mpp, source = self.mpp_override, "override"
        elif problem is None:
            mpp, source = float(np.sqrt(mx * my)), "metadata"
        else:
            mpp, source = None, None
        return SlideInfo(
            path=str(self.path),
            backend=b.name,
            vendor=meta.get("vendor"),
            levels=levels,
            mpp=mpp,
            mpp_source=source,
            mpp_reported=reported,
            mpp_problem=problem,
            objective_power=meta.get("objective_power"),
            associated_images=sorted(b.associated_image_names()),
            properties={str(k): str(v) for k, v in meta.get("properties", {}).items()},
        )

    # -- pickling: re-open in the worker --------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "mpp_override": self.mpp_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["mpp_override"])

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    def __repr__(self) -> str:
        w, h = self.info.dimensions
        return f"Slide({str(self.path)!r}, {w}x{h}, levels={len(self.info.levels)}, mpp={self.info.mpp})"

    # -- access ----------------------------------------------------------------------
    @property
    def mpp(self) -> float | None:
        return self.info.mpp

    @property
    def levels(self) -> list[LevelInfo]:
        return self.info.levels

    def require_mpp(self) -> float:
        """The level-0 pixel size, or a one-sentence error saying how to provide it."""
        if self.info.mpp is None:
            raise SlideError(
                f"{self.path}: {self.info.mpp_problem}; give the real pixel size (µm/px at full "
                "resolution) as an mpp override (--mpp-override on the command line)."
            )
        return self.info.mpp

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read an RGB uint8 region; ``x, y, width, height`` are in pixels of ``level``.

        Parts outside the image are white.
        """
        return self._backend.read_region(level, int(x), int(y), int(width), int(height))

    def level_array(self, level: int = 0):
        """Level ``level`` as a lazy ``(height, width, 3)`` uint8 dask array, chunks aligned to tiles."""
        return self._backend.level_dask(level)

    def pyramid(self) -> list:
        """All levels as lazy dask arrays, largest first (a napari multiscale image)."""
        return [self.level_array(i) for i in range(len(self.levels))]

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self.info.associated_images:
            raise SlideError(
                f"{self.path}: no associated image '{name}'; it has {self.info.associated_images or 'none'}."
            )
        return self._backend.associated_image(name)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level whose downsample does not exceed ``downsample`` (plus 1%)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * 1.01:
                best = i
        return best

    def read_downsampled(self, downsample: float) -> tuple[np.ndarray, float]:
        """The whole slide at roughly ``downsample`` (level-0 px per output px).

        Reads the best level and resizes; returns the image and its exact downsample.
        """
        from PIL import Image

        level = self.best_level_for_downsample(downsample)
        lv = self.levels[level]
        img = self.read_region(level, 0, 0, lv.width, lv.height)
        w0, h0 = self.info.dimensions
        out_w = max(1, int(round(w0 / downsample)))
        out_h = max(1, int(round(h0 * out_w / w0)))  # one scale for both axes
        if (out_w, out_h) != (lv.width, lv.height):
            img = np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.Resampling.BOX))
        return img, w0 / out_w

    def content_hash(self, algorithm: str = CONTENT_HASH) -> str:
        """``"xxh3-128:<hex>"`` of the slide's bytes (see :func:`file_hash`)."""
        return file_hash(self.path, algorithm)

    def content_stat(self) -> tuple[int, int]:
        """(bytes, latest modification time in ns) of the files :meth:`content_hash` covers:
        equal content has equal size, and an unchanged file keeps its size and time."""
        stats = [f.stat() for f in slide_files(self.path)[1]]
        return sum(st.st_size for st in stats), max(st.st_mtime_ns for st in stats)


def slide_files(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(base, files): every file a slide's content is in (for a folder or MIRAX slide, all of
    them; for a DICOM instance, every instance of its series folder), names relative to base."""
    p = Path(path)
    files = [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    elif p.suffix.lower() == ".dcm":
        files = sorted(p.parent.glob("*.dcm"))  # every instance of the series folder
        p = p.parent
    elif p.suffix.lower() == ".mrxs" and p.with_suffix("").is_dir():
        files += sorted(f for f in p.with_suffix("").rglob("*") if f.is_file())
    return p, files


def hash_algorithm(content_hash: str | None) -> str | None:
    """The algorithm of a recorded content hash (``"xxh3-128:..."`` -> ``"xxh3-128"``), or ``None``."""
    algo = (content_hash or "").partition(":")[0]
    return algo if algo in HASH_ALGORITHMS else None


def _hasher(algorithm: str):
    if algorithm == "xxh3-128":
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown content hash {algorithm!r}; known: {', '.join(HASH_ALGORITHMS)}")


def _hash_file(h, f: Path, chunk: int, window: int = 64 << 20) -> None:
    """Feed a file's bytes to ``h`` from the page cache without copying them out: mapped a
    window at a time (so the mapping never holds more than ``window`` bytes of the file in
    the process's memory); read where a file cannot be mapped (empty, or no mmap)."""
    import mmap

    window = max(mmap.ALLOCATIONGRANULARITY, window // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY)
    with open(f, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        for offset in range(0, size, window):
            try:
                m = mmap.mmap(fh.fileno(), min(window, size - offset), access=mmap.ACCESS_READ, offset=offset)
            except (ValueError, OSError):  # a file system without mmap: read the rest
                fh.seek(offset)
                while block := fh.read(chunk):
                    h.update(block)
                return
            with m:
                view = memoryview(m)
                try:
                    for start in range(0, len(m), chunk):
                        h.update(view[start:start + chunk])
                finally:
                    view.release()


def file_hash(path: str | os.PathLike, algorithm: str = CONTENT_HASH, chunk: int = 8 << 20) -> str:
    """``"<algorithm>:<hex>"`` of a slide's bytes (for a folder or MIRAX slide, of all its
    files and their names): XXH3-128 by default, or SHA-256 (the hash of older stores)."""
    p, files = slide_files(path)
    h = _hasher(algorithm)
    for f in files:
        if f != p:
            h.update(str(f.relative_to(p if p.is_dir() else p.parent)).encode())
        _hash_file(h, f, chunk)
    return f"{algorithm}:{h.hexdigest()}"


def _make_backend(kind: str, path: Path):
    if kind == "openslide":
        from .backends.openslide_backend import OpenSlideBackend

        return OpenSlideBackend(path)
    if kind == "tiff":
        from .backends.tiff_backend import TiffBackend

        return TiffBackend(path)
    if kind == "omezarr":
        from .backends.omezarr_backend import OmeZarrBackend

        return OmeZarrBackend(path)
    from .backends.image_backend import ImageBackend

    return ImageBackend(path)


def open_slide(path: str | os.PathLike, mpp_override: float | None = None) -> Slide:
    """Open a whole-slide image (or plain image) lazily; see :class:`Slide`."""
    return Slide(path, mpp_override=mpp_override)
