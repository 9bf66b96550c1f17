"""``protodiff embed``, ``protodiff prototypes`` and ``protodiff prototype-map``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app
from ._common import print_json, run_with_progress


def _config(model, **kw):
    from ..core.errors import ProtodiffError
    from ..core.errors import validation_message

    try:
        return model(**kw)
    except ValueError as exc:
        raise ProtodiffError(validation_message(exc)) from None


@app.command()
def embed(
    store: Optional[Path] = typer.Argument(None, help="Patch store (.zarr) made by protodiff tile."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help="builtin (default), a registered name (uni, phikon, vit-small, or an exported DINO encoder), an exported encoder folder, or a weights file (with --arch)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture of a weights file, e.g. vit_small_patch16_224."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local weights file of a named encoder (.safetensors, or .pt read with weights_only)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Input side (px) the weights were trained at, if not the architecture's default."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."),
    batch_size: int = typer.Option(128, "--batch-size", help="Patches per forward pass."),
    slide: Optional[List[str]] = typer.Option(None, "--slide", help="Only these slide ids (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute complete embeddings from the same encoder."),
    list_encoders: bool = typer.Option(False, "--list-encoders", help="List the registered encoders and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Embed every patch of a store with an encoder (resumes an interrupted run)."""
    from ..core.embedding import EmbedConfig, embed_store

    if list_encoders:
        from ..core.encoders import available_encoders

        rows = available_encoders()
        if as_json:
            print_json(rows)
        else:
            for r in rows:
                typer.echo(f"{r['name']:<14} {'needs --weights' if r['needs_weights'] else 'no weights':<16} {r['description']}")
        return
    if store is None:
        from ..core.errors import ProtodiffError

        raise ProtodiffError("Name the patch store to embed (protodiff embed STORE).")
    cfg = _config(EmbedConfig, encoder=encoder, arch=arch, weights=str(weights) if weights else None,
                  input_size=input_size, device=device, batch_size=batch_size, slides=slide or None, overwrite=overwrite)
    result = run_with_progress(embed_store(store, cfg), quiet=quiet or as_json)
    if as_json:
        print_json(result.to_dict())
        return
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    for s in result.slides:
        verb = {"skip": "already embedded, left alone", "resume": "resumed", "new": "embedded", "overwrite": "re-embedded"}[s["action"]]
        typer.echo(f"{s['slide_id']}: {s['n_patches']} patches ({verb})")
    typer.echo(f"encoder {result.key} ({result.encoder['dim']}-d) on {result.device}: {result.patches_embedded} patches "
               f"in {result.seconds:.1f} s ({result.patches_per_second:.0f} patches/s)")


def _parse_ks(text: str) -> list[int]:
    from ..core.errors import ProtodiffError

    ks: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if ":" in part:
                a, b = (int(v) for v in part.split(":"))
                ks.extend(range(a, b + 1))
            elif part:
                ks.append(int(part))
    except ValueError:
        raise ProtodiffError(f"--scan-k '{text}': give numbers like 2,4,8,16 or a range like 2:12.") from None
    if not ks or min(ks) < 1:
        raise ProtodiffError(f"--scan-k '{text}': give at least one k >= 1.")
    return ks


@app.command()
def prototypes(
    store: Path = typer.Argument(..., help="Patch store with embeddings (protodiff embed)."),
    k: Optional[int] = typer.Option(None, "-k", "--k", help="Number of prototypes (default 16)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same prototypes."),
    restarts: int = typer.Option(3, "--restarts", help="k-means runs; the lowest inertia wins."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help="Which embeddings (encoder key or name), if the store has several."),
    normalize: str = typer.Option("auto", "--normalize", help="auto, none, l2, standardize or standardize+l2."),
    algorithm: str = typer.Option("auto", "--algorithm", help="auto, lloyd or minibatch."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Soft-membership temperature (default: mean squared distance)."),
    exemplars: int = typer.Option(16, "--exemplars", help="Exemplar patches kept per prototype."),
    device: str = typer.Option("cpu", "--device", help="Device for k-means (cpu, cuda, mps, auto)."),
    table: Optional[Path] = typer.Option(None, "--table", help="Also write one row per patch (slide, x, y, prototype, membership) to FILE.csv or FILE.parquet."),
    scan_k: Optional[str] = typer.Option(None, "--scan-k", help="Only show inertia and silhouette for these k (e.g. 2,4,8,16 or 2:12); writes nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the prototypes already in the store."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Cluster the store's embeddings into prototypes (k-means) and save them in the store."""
    from ..core import prototypes as P
    from ..core.store import PatchStore

    if scan_k:
        rows = run_with_progress(P.choose_k(store, _parse_ks(scan_k), encoder=encoder, normalize=normalize, seed=seed),
                                 quiet=quiet or as_json)
        if as_json:
            print_json(rows)
            return
        typer.echo(f"{'k':>4} {'inertia':>14} {'mean d²':>10} {'silhouette':>10}")
        for r in rows:
            typer.echo(f"{r['k']:>4} {r['inertia']:>14.6g} {r['mean_sqdist']:>10.4g} {r['silhouette']:>10.3f}")
        return
    st = PatchStore(store)
    if k is None and table is not None and not overwrite and P.prototype_status(st) == "complete":
        out = P.write_table(st, table)  # the existing prototypes, as a table
        if as_json:
            print_json({"store": str(store), "table": str(out), "prototypes": "existing"})
        else:
            typer.echo(f"wrote {out} from the store's existing prototypes")
        return
    cfg = _config(P.PrototypeConfig, k=16 if k is None else k, seed=seed, restarts=restarts, encoder=encoder,
                  normalize=normalize, algorithm=algorithm, temperature=temperature, n_exemplars=exemplars,
                  device=device, overwrite=overwrite)
    result = run_with_progress(P.fit_prototypes(store, cfg), quiet=quiet or as_json)
    d = result.to_dict()
    if table is not None:
        d["table"] = str(P.write_table(store, table))
    if as_json:
        print_json(d)
        return
    typer.echo(f"{result.k} prototypes of {result.n_patches} patches (encoder {result.encoder_key}, seed {result.seed}); "
               f"inertia {result.inertia:.6g}; {result.seconds:.1f} s")
    typer.echo("sizes: " + " ".join(f"{j}:{n}" for j, n in enumerate(result.sizes)))
    for sid, sh in result.shares.items():
        top = sorted(range(len(sh)), key=lambda j: -sh[j])[:5]
        typer.echo(f"  {sid:<30} " + "  ".join(f"{j}:{sh[j]:.0%}" for j in top if sh[j] > 0))
    if table is not None:
        typer.echo(f"table: {d['table']}")


@app.command("prototype-map")
def prototype_map(
    store: Path = typer.Argument(..., help="Patch store with prototypes."),
    slide: str = typer.Option(..., "--slide", help="Slide id (see protodiff info STORE)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Label image: FILE.tif (OME-TIFF) or FILE.zarr (OME-Zarr)."),
    png: Optional[Path] = typer.Option(None, "--png", help="PNG overlay of the map on the slide."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Export one slide's prototype map: a label image with its pixel size, and/or a PNG overlay."""
    from ..core.prototype_map import export_prototype_map

    out = export_prototype_map(store, slide, output, png)
    if as_json:
        print_json(out)
        return
    h, w = out["shape"]
    typer.echo(f"{slide}: {w} x {h} map pixels of {out['pixel_size_um']:.4g} µm, {out['k']} prototypes")
    for key in ("map", "png"):
        if key in out:
            typer.echo(f"  {key:<4} {out[key]}")
