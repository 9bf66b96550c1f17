"""``protodiff demo``: every landed stage on the bundled sample slide, with pictures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from . import app
from ._common import run_with_progress


@app.command()
def demo(
    output: Path = typer.Option(Path("protodiff-demo"), "-o", "--output", help="Folder for the demo's outputs."),
    slide: Optional[Path] = typer.Option(None, "--slide", help="Another slide instead of the bundled sample."),
    workers: int = typer.Option(2, "--workers", help="Local parallel workers."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs of an earlier demo run."),
) -> None:
    """Run the pipeline's landed stages end to end on the bundled CMU-1-Small-Region slide."""
    import shutil

    from ..core.errors import ProtodiffError
    from ..core.figures import mosaic_png, overlay_png
    from ..core.slide import open_slide
    from ..core.store import PatchStore
    from ..core.tiling import TilingConfig, plan_slide, tile_slides
    from ..data import SAMPLE_SLIDE

    src = slide or SAMPLE_SLIDE
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ProtodiffError(f"{output}: exists and is not empty; pass --overwrite or choose another --output.")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"slide": str(src), "outputs": {}}

    typer.echo(f"[1/3] slide: {src}")
    with open_slide(src) as s:
        report["slide_info"] = s.info.to_dict()
        cfg = TilingConfig(workers=workers)
        sl, mask, grid = plan_slide(src, cfg)
        rgb, ds = sl.read_downsampled(max(1.0, max(sl.info.dimensions) / 1600))
        sl.close()
    overlay = overlay_png(rgb, ds, mask, grid, output / "tissue_and_grid.png")
    report["outputs"]["tissue_and_grid"] = str(overlay)
    typer.echo(f"      {s.info.dimensions[0]} x {s.info.dimensions[1]} px at {s.info.mpp} µm/px; "
               f"tissue {mask.tissue_fraction:.0%} of the slide; {grid.n_patches} patches planned")

    typer.echo("[2/3] tiling into a patch store")
    store_path = output / "patches.zarr"
    result = run_with_progress(tile_slides([src], store_path, cfg))
    st = PatchStore(store_path)
    entry = st.slides()[0]
    mosaic = mosaic_png(entry.patches()[: min(32, entry.n_patches)].compute(), output / "patches_mosaic.png")
    report["tiling"] = result.to_dict()
    report["outputs"].update(patch_store=str(store_path), patches_mosaic=str(mosaic))
    typer.echo(f"      {result.patches_written} patches ({result.patches_per_second:.0f} patches/s)")

    typer.echo("[3/3] embedding (built-in stain/texture encoder) and prototypes")
    report["prototypes"] = _prototypes_stage(store_path, output, report["outputs"])
    report["pretraining"] = _pretraining_stage(store_path, output, report["outputs"])
    report["diffusion"] = _diffusion_stage(src, output, report["outputs"])
    report["seconds"] = round(time.perf_counter() - t0, 2)
    (output / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    typer.echo("")
    typer.echo(f"Done in {report['seconds']} s. Outputs in {output.resolve()}:")
    typer.echo(f"  patch store      {store_path}   (open: protodiff info {store_path})")
    typer.echo(f"  tissue + grid    {overlay}")
    typer.echo(f"  patch mosaic     {mosaic}")
    typer.echo(f"  prototype map    {report['outputs']['prototype_map']}")
    typer.echo(f"  exemplars        {report['outputs']['prototype_exemplars']}")
    if "encoder" in report["outputs"]:
        typer.echo(f"  DINO encoder     {report['outputs']['encoder']}   (use: --encoder {output / 'pretrain'})")
    if "guided_samples" in report["outputs"]:
        typer.echo(f"  guided samples   {report['outputs']['guided_samples']}   (model: {report['outputs']['diffusion_model']})")
    typer.echo(f"  report           {output / 'demo_report.json'}")
    typer.echo("  napari           napari " + str(src) + "  (then Plugins > protodiff > Slides)")


def _prototypes_stage(store_path: Path, output: Path, outputs: dict) -> dict:
    """Embed the demo store with the built-in encoder, fit a few prototypes, draw them."""
    from ..core.embedding import embed_store
    from ..core.figures import exemplar_gallery_png
    from ..core.progress import drain
    from ..core.prototype_map import export_prototype_map, palette
    from ..core.prototypes import PrototypeConfig, exemplar_patches, fit_prototypes
    from ..core.store import PatchStore

    emb = run_with_progress(embed_store(store_path))
    n = emb.patches_embedded
    k = max(1, min(4, n))
    res = drain(fit_prototypes(store_path, PrototypeConfig(k=k, seed=0, n_exemplars=8)))
    sid = PatchStore(store_path).slide_ids[0]
    m = export_prototype_map(store_path, sid, output / "prototype_map.ome.tif", output / "prototype_map.png")
    rows = exemplar_patches(store_path, 8)
    gallery = exemplar_gallery_png(rows, palette(k), output / "prototype_exemplars.png",
                                   titles=[f"{j}:{res.sizes[j]}" for j in range(k)])
    outputs.update(prototype_map=m["png"], prototype_labels=m["map"], prototype_exemplars=str(gallery))
    typer.echo(f"      {n} patches embedded ({emb.patches_per_second:.0f} patches/s); {k} prototypes, sizes "
               + ", ".join(str(v) for v in res.sizes))
    return {"embedding": emb.to_dict(), "fit": res.to_dict(), "map": m}


def _pretraining_stage(store_path: Path, output: Path, outputs: dict) -> dict:
    """A few steps of DINO (tiny preset) on the demo store; the exported encoder is usable as --encoder."""
    try:
        import lightly  # noqa: F401
        import timm  # noqa: F401
    except ImportError:
        typer.echo("[+] DINO pretraining skipped (install the ml extra: torch, timm, lightly)")
        return {"skipped": "ml extra not installed"}
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ..core.ssl import PretrainConfig
    from ..core.ssl.train import pretrain

    typer.echo("[+] DINO pretraining (ViT-Tiny, tiny preset, 4 steps: a smoke run; see docs/pretraining.md)")
    cfg = PretrainConfig(real=[str(store_path)], preset="tiny", epochs=2, images_per_epoch=32, batch_size=16,
                         workers=1)
    res = run_with_progress(pretrain(cfg, output / "pretrain"))
    outputs.update(pretrain_run=str(output / "pretrain"), encoder=res.encoder)
    typer.echo(f"      {res.steps} steps in {res.seconds:.0f} s (DINO loss {res.last_loss:.3f}); encoder {res.encoder}")
    return res.to_dict()


def _diffusion_stage(src: Path, output: Path, outputs: dict) -> dict:
    """Tiny latent diffusion on 32-px patches of the slide: train, sample guided and unguided, measure."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        typer.echo("[+] diffusion skipped (install the ml extra: torch, diffusers, safetensors)")
        return {"skipped": "ml extra not installed"}
    import numpy as np

    from ..core.diffusion.config import DiffusionConfig, SampleConfig
    from ..core.diffusion.fidelity import evaluate_fidelity, strip_arrays
    from ..core.diffusion.fit import train_diffusion
    from ..core.diffusion.prototypes_adapter import make_prototypes, store_patches
    from ..core.diffusion.synthesize import synthesize
    from ..core.figures import mosaic_png
    from ..core.store import PatchStore
    from ..core.tiling import TilingConfig, tile_slides

    typer.echo("[+] prototype-guided diffusion (tiny preset: 32-px patches at 1 µm/px, k = 2 prototypes)")
    small = output / "patches32.zarr"
    run_with_progress(tile_slides([src], small, TilingConfig(size=32, mpp=1.0)))
    pset = make_prototypes(small, k=2, seed=0)
    model = output / "diffusion-model"
    metrics = run_with_progress(train_diffusion(small, model, DiffusionConfig.from_preset("tiny")))
    synth = output / "synthetic.zarr"
    n = 32
    for g in (0.0, 10.0):
        run_with_progress(synthesize(model, synth, SampleConfig(n=n, guidance=g, steps=25, seed=0, batch_size=n,
                                                                   scheduler="ddpm")))
    rep = strip_arrays(evaluate_fidelity(small, synth, max_real=2000))
    real = store_patches(PatchStore(small))
    runs = PatchStore(synth).slides()
    guided = np.asarray(runs[-1].group["patches"][:])
    req = np.asarray(runs[-1].group["prototype"][:])
    rows = []
    for p in range(pset.k):  # per prototype: 8 real exemplars, then 8 guided samples
        rows += [real[pset.labels == p][:8], guided[req == p][:8]]
    tiles = np.concatenate(rows).repeat(3, axis=1).repeat(3, axis=2)  # 32 px -> 96 px, to be seen
    png = mosaic_png(tiles, output / "guided_samples.png", columns=8)
    outputs.update(diffusion_model=str(model), synthetic_store=str(synth), guided_samples=str(png))
    table = {r["guidance"]: r for r in rep["runs"]}
    for g, r in table.items():
        typer.echo(f"      guidance {g:>4}: hit rate {r['hit']['hit_rate']:.2f}, FD {r['frechet_distance']:.1f}, "
                   f"precision {r['precision']:.2f}, recall {r['recall']:.2f}, near-copies "
                   f"{r['memorisation']['pixels']['near_copies']}")
    typer.echo(f"      rows of guided_samples.png: prototype 0 real, prototype 0 guided, prototype 1 real, ...")
    return {"training": metrics, "fidelity": rep}
