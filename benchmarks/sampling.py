"""Sampling benchmark: protodiff's PrototypeGuidedPipeline against diffusers' stock DDIMPipeline.

In one run, with the *same* UNet, scheduler (DDIM) and number of steps:

* ``diffusers-ddim``: ``diffusers.DDIMPipeline(unet, scheduler)(batch_size=B, num_inference_steps=K,
  output_type="np")`` - the stock unguided loop;
* ``protodiff-unguided``: ``PrototypeGuidedPipeline(...)(guidance_scale=0, output_type="latent")``;
* ``protodiff-guided``: the same with classifier guidance (scale 3, balanced prototypes): one
  extra forward + backward of the noise-aware classifier per guided step (t / T >= 0.4), and the clip of the
  guided clean latent;
* ``protodiff-guided-noclip``: the same without that clip (``guidance_x0_clip=None``).
* ``protodiff-guided-every-step``: the same with guidance at every step (``guidance_min_t=0``;
  by default only the steps with t / T >= 0.4 are guided).

Both pipelines stop at the latents (the stock pipeline has no autoencoder), so the comparison
is the denoising loop; the autoencoder's decode is timed on its own. Contenders run
interleaved, ``--repeats`` times each after a warm-up, and the median is reported. The
timing does not depend on the weights, so by default the models are the preset's
architecture with seeded random weights (``--model DIR`` uses a trained model folder).

Targets: unguided <= 1.05 x diffusers' time per image; guided <= 1.2 x unguided.

Run ``.venv/bin/python benchmarks/sampling.py [--preset tiny|small|base] [--batch 32] [--steps 50]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(preset: str, model: str | None, device: str):
    import torch

    from napari_protodiff.core.diffusion.autoencoder import build_autoencoder
    from napari_protodiff.core.diffusion.classifier import build_classifier
    from napari_protodiff.core.diffusion.config import DiffusionConfig
    from napari_protodiff.core.diffusion.pipeline import PrototypeGuidedPipeline
    from napari_protodiff.core.diffusion.unet import build_scheduler, build_unet

    if model:
        pipe = PrototypeGuidedPipeline.from_pretrained(model, device=device)
        pipe.set_scheduler("ddim")
        return pipe, pipe.protodiff_meta.get("config", {}).get("preset", "trained")
    cfg = DiffusionConfig.from_preset(preset)
    torch.manual_seed(0)
    pipe = PrototypeGuidedPipeline(vae=build_autoencoder(cfg.autoencoder, cfg.image_size), unet=build_unet(cfg),
                                   scheduler=build_scheduler(cfg, "ddim"), classifier=build_classifier(cfg, 8))
    pipe.to(device)
    for m in (pipe.vae, pipe.unet, pipe.classifier):
        m.eval().requires_grad_(False)
    return pipe, preset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--model", default=None, help="A trained model folder instead of random weights.")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the results to this JSON file.")
    args = ap.parse_args(argv)

    import torch
    from diffusers import DDIMPipeline

    from napari_protodiff.core.diffusion.classifier import flops
    from napari_protodiff.core.diffusion.training import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pipe, preset = build(args.preset, args.model, str(device))
    stock = DDIMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    stock.set_progress_bar_config(disable=True)
    b, k = args.batch, args.steps
    z = torch.zeros(1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                    device=device)
    tt = torch.zeros(1, dtype=torch.long, device=device)
    ratio_flops = flops(pipe.classifier, z, tt) / flops(pipe.unet, z, tt)

    def gens():
        return [torch.Generator(device=device).manual_seed(i) for i in range(b)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    runs = {
        "diffusers-ddim": lambda: stock(batch_size=b, generator=gens(), num_inference_steps=k, output_type="np"),
        "protodiff-unguided": lambda: pipe(prototypes="balanced", num_images=b, guidance_scale=0.0,
                                           num_inference_steps=k, generator=gens(), output_type="latent"),
        "protodiff-guided": lambda: pipe(prototypes="balanced", num_images=b, guidance_scale=args.guidance,
                                         num_inference_steps=k, generator=gens(), output_type="latent"),
        "protodiff-guided-noclip": lambda: pipe(prototypes="balanced", num_images=b, guidance_scale=args.guidance,
                                                num_inference_steps=k, generator=gens(), output_type="latent",
                                                guidance_x0_clip=None),
        "protodiff-guided-every-step": lambda: pipe(prototypes="balanced", num_images=b, guidance_scale=args.guidance,
                                                    num_inference_steps=k, generator=gens(), output_type="latent",
                                                    guidance_min_t=0.0),
    }
    times: dict[str, list[float]] = {n: [] for n in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    with torch.no_grad():
        lat = torch.randn(b, *z.shape[1:], device=device)
        from napari_protodiff.core.diffusion.autoencoder import decode_latents

        decode_latents(pipe.vae, lat)
        sync()
        t0 = time.perf_counter()
        decode_latents(pipe.vae, lat)
        sync()
        t_dec = time.perf_counter() - t0
    med = {n: statistics.median(v) for n, v in times.items()}
    res = {
        "preset": preset, "batch": b, "steps": k, "guidance": args.guidance, "device": str(device),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "classifier_flops_ratio": round(ratio_flops, 4),
        "seconds_per_batch": {n: round(v, 4) for n, v in med.items()},
        "images_per_second": {n: round(b / v, 2) for n, v in med.items()},
        "ratio_unguided_vs_diffusers": round(med["protodiff-unguided"] / med["diffusers-ddim"], 3),
        "ratio_guided_vs_unguided": round(med["protodiff-guided"] / med["protodiff-unguided"], 3),
        "ratio_guided_noclip_vs_unguided": round(med["protodiff-guided-noclip"] / med["protodiff-unguided"], 3),
        "ratio_guided_every_step_vs_unguided": round(med["protodiff-guided-every-step"] / med["protodiff-unguided"], 3),
        "decode_seconds_per_batch": round(t_dec, 4), "repeats": args.repeats,
        "all_seconds": {n: [round(x, 4) for x in v] for n, v in times.items()},
    }
    print(f"preset {preset}: batch {b}, {k} DDIM steps, device {device}, {res['threads']} threads; "
          f"classifier = {ratio_flops:.1%} of the UNet's FLOPs")
    print("| contender | s / batch | images/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| diffusers DDIMPipeline | {med['diffusers-ddim']:.3f} | {b / med['diffusers-ddim']:.1f} | 1.00 |")
    print(f"| protodiff unguided | {med['protodiff-unguided']:.3f} | {b / med['protodiff-unguided']:.1f} | "
          f"{res['ratio_unguided_vs_diffusers']:.3f} x diffusers |")
    print(f"| protodiff guided (s = {args.guidance:g}) | {med['protodiff-guided']:.3f} | "
          f"{b / med['protodiff-guided']:.1f} | {res['ratio_guided_vs_unguided']:.3f} x unguided |")
    print(f"| protodiff guided, no x0 clip | {med['protodiff-guided-noclip']:.3f} | "
          f"{b / med['protodiff-guided-noclip']:.1f} | {res['ratio_guided_noclip_vs_unguided']:.3f} x unguided |")
    print(f"| protodiff guided, every step | {med['protodiff-guided-every-step']:.3f} | "
          f"{b / med['protodiff-guided-every-step']:.1f} | {res['ratio_guided_every_step_vs_unguided']:.3f} x unguided |")
    print(f"autoencoder decode: {t_dec:.3f} s / batch")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
