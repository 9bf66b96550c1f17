"""``protodiff demo``: every landed stage on the bundled sample slide, with pictures.

Stages: the slide (tissue mask, patch grid), tiling into a patch store, embedding and
prototypes, a tiny prototype-guided diffusion model (32-px patches; guided and unguided
samples, fidelity numbers) and, last, a tiny data-efficiency study that reuses the
diffusion stage's real store, model and synthetic stores: DINO encoders pretrained for a
few steps on real, guided synthetic, hybrid and unguided synthetic patches plus a
random-initialised one, evaluated against the built-in encoder on a planted cohort and a
patch probe (:func:`napari_protodiff.core.evaluation.study.demo_study_config`). The
seconds of every stage go into ``demo_report.json`` (``stage_seconds``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from . import app
from ._common import run_with_progress

# The study's DINO runs: two steps of 16 images per arm at the peak learning rate (a smoke run; see
# docs/pretraining.md). Its one task is the planted cohort (ABMIL): the patch probe of `study --demo`
# would cost as much again.
STUDY_PRETRAIN = {"preset": "tiny", "epochs": 1, "images_per_epoch": 32, "batch_size": 16, "warmup_epochs": 0,
                  "workers": 0}
STUDY_GUIDANCE = 10.0


class _Clock:
    """Wall-clock seconds per stage, in order, and the demo process's CPU seconds (all its threads; not its
    worker processes) per stage: on a shared machine the CPU seconds say more about the work than the wall clock."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.seconds[name] = round(t - self._t, 1)
        self.cpu_seconds[name] = round(c - self._c, 1)
        self._t, self._c = t, c


@app.command()
def demo(
    output: Path = typer.Option(Path("protodiff-demo"), "-o", "--output", help="Folder for the demo's outputs."),
    slide: Optional[Path] = typer.Option(None, "--slide", help="Another slide instead of the bundled sample."),
    workers: int = typer.Option(2, "--workers", help="Local parallel workers."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs of an earlier demo run."),
) -> None:
    """Run the pipeline's landed stages end to end on the bundled CMU-1-Small-Region slide, ending with a tiny
    data-efficiency study."""
    import os
    import shutil

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads (diffusion, DINO)
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
    clock = _Clock()
    report: dict = {"slide": str(src), "outputs": {}, "stage_seconds": clock.seconds,
                    "stage_cpu_seconds": clock.cpu_seconds}

    typer.echo(f"[1/5] slide: {src}")
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
    clock.lap("slide")

    typer.echo("[2/5] tiling into a patch store")
    store_path = output / "patches.zarr"
    result = run_with_progress(tile_slides([src], store_path, cfg))
    st = PatchStore(store_path)
    entry = st.slides()[0]
    mosaic = mosaic_png(entry.patches()[: min(32, entry.n_patches)].compute(), output / "patches_mosaic.png")
    report["tiling"] = result.to_dict()
    report["outputs"].update(patch_store=str(store_path), patches_mosaic=str(mosaic))
    typer.echo(f"      {result.patches_written} patches ({result.patches_per_second:.0f} patches/s)")
    clock.lap("tiling")

    typer.echo("[3/5] embedding (built-in stain/texture encoder) and prototypes")
    report["prototypes"] = _prototypes_stage(store_path, output, report["outputs"])
    clock.lap("prototypes")
    report["diffusion"] = _diffusion_stage(src, output, report["outputs"], clock)
    report["study"] = _study_stage(output, report["outputs"], clock)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    (output / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    outs = report["outputs"]
    typer.echo("")
    typer.echo(f"Done in {report['seconds']} s (" + ", ".join(f"{k} {v:g} s" for k, v in clock.seconds.items())
               + f"). Outputs in {output.resolve()}:")
    typer.echo(f"  patch store      {store_path}   (open: protodiff info {store_path})")
    typer.echo(f"  tissue + grid    {overlay}")
    typer.echo(f"  patch mosaic     {mosaic}")
    typer.echo(f"  prototype map    {outs['prototype_map']}")
    typer.echo(f"  exemplars        {outs['prototype_exemplars']}")
    if "guided_samples" in outs:
        typer.echo(f"  guided samples   {outs['guided_samples']}   (model: {outs['diffusion_model']})")
    if "encoder" in outs:
        typer.echo(f"  DINO encoder     {outs['encoder']}   (real arm of the study; use: --encoder {outs['pretrain_run']})")
    if "study_report" in outs:
        typer.echo(f"  study report     {outs['study_report']}")
    typer.echo(f"  report           {output / 'demo_report.json'}")
    typer.echo("  napari           napari " + str(src) + "  (then Plugins > protodiff > Slides)")
    if "study_report" in outs:
        typer.echo("")
        typer.echo("Tiny data-efficiency study (smoke scale: these numbers are not meaningful; see the report):")
        typer.echo(report["study"]["headline"].rstrip())


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


def _ml_missing(*modules: str) -> str | None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return ", ".join(missing) or None


def _diffusion_stage(src: Path, output: Path, outputs: dict, clock: _Clock) -> dict:
    """Tiny latent diffusion on 32-px patches of the slide: train, sample guided and unguided, measure."""
    missing = _ml_missing("torch", "diffusers")
    if missing:
        typer.echo(f"[4/5] diffusion skipped ({missing} missing: install the ml extra)")
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

    typer.echo("[4/5] prototype-guided diffusion (tiny preset: 32-px patches at 1 µm/px, k = 2 prototypes)")
    small = output / "patches32.zarr"
    run_with_progress(tile_slides([src], small, TilingConfig(size=32, mpp=1.0)))
    pset = make_prototypes(small, k=2, seed=0)
    clock.lap("diffusion: tiling + prototypes")
    model = output / "diffusion-model"
    metrics = run_with_progress(train_diffusion(small, model, DiffusionConfig.from_preset("tiny")))
    clock.lap("diffusion: training")
    # guided and unguided samples in stores of their own: the study pretrains on each
    synth, unguided = output / "synthetic.zarr", output / "synthetic-unguided.zarr"
    n = 32
    for store, g in ((unguided, 0.0), (synth, STUDY_GUIDANCE)):
        run_with_progress(synthesize(model, store, SampleConfig(n=n, guidance=g, steps=25, seed=0, batch_size=n,
                                                                   scheduler="ddpm")))
    clock.lap("diffusion: sampling")
    rep = strip_arrays(evaluate_fidelity(small, unguided, max_real=2000))
    rep["runs"] += strip_arrays(evaluate_fidelity(small, synth, max_real=2000))["runs"]
    rep["synthetic_store"] = [str(unguided), str(synth)]
    real = store_patches(PatchStore(small))
    run = PatchStore(synth).slides()[0]
    guided = np.asarray(run.group["patches"][:])
    req = np.asarray(run.group["prototype"][:])
    rows = []
    for p in range(pset.k):  # per prototype: 8 real exemplars, then 8 guided samples
        rows += [real[pset.labels == p][:8], guided[req == p][:8]]
    tiles = np.concatenate(rows).repeat(3, axis=1).repeat(3, axis=2)  # 32 px -> 96 px, to be seen
    png = mosaic_png(tiles, output / "guided_samples.png", columns=8)
    outputs.update(diffusion_model=str(model), patches32=str(small), synthetic_store=str(synth),
                   unguided_store=str(unguided), guided_samples=str(png))
    for r in rep["runs"]:
        typer.echo(f"      guidance {r['guidance']:>4}: hit rate {r['hit']['hit_rate']:.2f}, FD {r['frechet_distance']:.1f}, "
                   f"precision {r['precision']:.2f}, recall {r['recall']:.2f}, near-copies "
                   f"{r['memorisation']['pixels']['near_copies']}")
    typer.echo("      rows of guided_samples.png: prototype 0 real, prototype 0 guided, prototype 1 real, ...")
    clock.lap("diffusion: fidelity")
    return {"training": metrics, "fidelity": rep}


def _study_stage(output: Path, outputs: dict, clock: _Clock) -> dict:
    """The tiny data-efficiency study on what the diffusion stage made (no retraining, no resampling)."""
    missing = _ml_missing("torch", "timm", "lightly")
    if missing or "diffusion_model" not in outputs:
        typer.echo(f"[5/5] study skipped ({missing or 'no diffusion model'}: install the ml extra)")
        return {"skipped": "ml extra not installed"}
    from ..core.evaluation.compare import table_markdown
    from ..core.evaluation.study import demo_study_config, load_study_config, run_study

    typer.echo("[5/5] tiny data-efficiency study: DINO (ViT-Tiny, 2 steps each) on real, guided synthetic, hybrid "
               "and unguided synthetic patches, a random-init encoder and the built-in one, on a planted cohort "
               "(ABMIL)")
    folder = output / "study"
    config = run_with_progress(demo_study_config(
        folder, outputs["patches32"], full=True, pretrain=STUDY_PRETRAIN, diffusion_model=outputs["diffusion_model"],
        synthetic=outputs["synthetic_store"], synthetic_unguided=outputs["unguided_store"], guidance=STUDY_GUIDANCE,
        probe=False))
    rows, report, rd = run_with_progress(run_study(load_study_config(config), folder / "run"))
    table = table_markdown(rows, "real")  # the headline: ABMIL on the planted cohort
    stages = json.loads((rd.path / "stages.json").read_text())
    outputs.update(study_report=str(report), study_run=str(rd.path), pretrain_run=str(rd.path / "pretrain" / "real"),
                   encoder=stages["pretrain:real"])
    clock.lap("study")
    return {"config": str(config), "run_dir": str(rd.path), "report": str(report), "headline": table,
            "table": rows}
