"""``protodiff info`` and ``protodiff tile``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app
from ._common import print_json, run_with_progress


@app.command()
def info(
    slide: Path = typer.Argument(..., help="Slide file (SVS, NDPI, MRXS, DICOM, TIFF, OME-Zarr, PNG/JPEG) or patch store."),
    mpp_override: Optional[float] = typer.Option(None, "--mpp-override", help="Level-0 pixel size (µm/px) to use instead of the file's."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    properties: bool = typer.Option(False, "--properties", help="Include every raw metadata property."),
) -> None:
    """Show a slide's pyramid, pixel size, objective, vendor and associated images (or a store's summary)."""
    from ..core.slide import open_slide
    from ..core.store import PatchStore

    if slide.is_dir() and PatchStore.is_store(slide):
        summary = PatchStore(slide).summary()
        if as_json:
            print_json(summary)
            return
        typer.echo(f"patch store {summary['path']}: {summary['patch_size']} px at {summary['mpp']:g} µm/px, "
                   f"{summary['n_patches']} patches")
        for s in summary["slides"]:
            typer.echo(f"  {s['slide_id']:<30} {s['status']:<9} {s['n_patches']:>8} patches  {s['path']}")
        return
    with open_slide(slide, mpp_override=mpp_override) as s:
        d = s.info.to_dict(with_properties=properties)
    if as_json:
        print_json(d)
        return
    w, h = d["dimensions"]
    typer.echo(f"{d['path']}")
    typer.echo(f"  backend      {d['backend']} (vendor: {d['vendor'] or 'unknown'})")
    typer.echo(f"  dimensions   {w} x {h} px")
    if d["mpp"] is not None:
        typer.echo(f"  pixel size   {d['mpp']:.4g} µm/px ({d['mpp_source']}); {w * d['mpp'] / 1000:.2f} x {h * d['mpp'] / 1000:.2f} mm")
    else:
        typer.echo("  pixel size   UNKNOWN: " + (d["mpp_problem"] or "") + "; pass --mpp-override")
    if d["mpp_problem"] and d["mpp"] is not None:
        typer.echo(f"  note         file's own pixel size not used: {d['mpp_problem']}")
    typer.echo(f"  objective    {str(d['objective_power']) + 'x' if d['objective_power'] else 'unknown'}")
    typer.echo(f"  associated   {', '.join(d['associated_images']) or 'none'}")
    typer.echo("  levels")
    for lv in d["levels"]:
        mpp = f"{lv['mpp']:.4g} µm/px" if lv["mpp"] else "?"
        typer.echo(f"    {lv['index']}: {lv['width']} x {lv['height']}  downsample {lv['downsample']:.4g}  "
                   f"tiles {lv['tile_width']}x{lv['tile_height']}  {mpp}")
    if properties:
        for k, v in sorted(d["properties"].items()):
            typer.echo(f"  {k} = {v}")


@app.command()
def tile(
    slides: List[Path] = typer.Argument(..., help="Slides to tile."),
    output: Path = typer.Option(..., "-o", "--output", help="Patch store (.zarr) to create or append to."),
    size: int = typer.Option(256, "--size", help="Patch side in pixels."),
    mpp: float = typer.Option(0.5, "--mpp", help="Patch resolution in µm/px."),
    min_tissue: float = typer.Option(0.5, "--min-tissue", help="Minimum tissue fraction of a kept patch (0-1)."),
    mpp_override: Optional[float] = typer.Option(None, "--mpp-override", help="Level-0 pixel size (µm/px) of the slides, replacing the files' own."),
    workers: int = typer.Option(1, "--workers", help="Local parallel workers (dask)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of an existing dask.distributed scheduler (tcp://host:port)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Re-tile slides already in the store."),
    shard_patches: Optional[int] = typer.Option(None, "--shard-patches", help="Patches per shard file (default: (2048 // size)², at most 4096; 1: one file per patch)."),
    compression: str = typer.Option("none", "--compression", help="Lossless compression of the stored patches: none (fastest to write and read), lz4 (saves 0-9 % on H&E) or zstd (5-19 %, for about as much CPU as decoding the slide)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Detect tissue and tile slides into a zarr patch store (appends; resumes interrupted slides)."""
    from ..core.errors import ProtodiffError, validation_message
    from ..core.tiling import TilingConfig, tile_slides

    if workers > 1 and scheduler:
        raise ProtodiffError("Give either --workers or --scheduler, not both.")
    try:
        cfg = TilingConfig(size=size, mpp=mpp, min_tissue=min_tissue, mpp_override=mpp_override, workers=workers,
                           scheduler=scheduler, overwrite=overwrite, shard_patches=shard_patches,
                           compression=compression)
    except ValueError as exc:
        raise ProtodiffError(validation_message(exc)) from None
    from ..core.interrupts import cancel_on_signals

    # SIGTERM (a scheduler's stop) or Ctrl-C: the blocks written so far are kept, exit 130
    with cancel_on_signals(resume="the same command resumes it, keeping the blocks already written"):
        result = run_with_progress(tile_slides(slides, output, cfg), quiet=quiet or as_json)
    if as_json:
        print_json(result.to_dict())
        return
    for s in result.slides:
        verb = {"skip": "already in store, left alone", "resume": "resumed", "new": "tiled", "overwrite": "re-tiled"}[s["action"]]
        typer.echo(f"{s['slide_id']}: {s['n_patches']} patches ({verb}; level {s['level']}, {s['patch_mpp']:.4g} µm/px"
                   f"{', resampled' if s['resampled'] else ''})")
    typer.echo(f"wrote {result.patches_written} patches in {result.seconds:.1f} s "
               f"({result.patches_per_second:.0f} patches/s) to {result.store}")

