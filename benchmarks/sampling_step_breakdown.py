"""One denoising step of the tiny preset taken apart: the UNet's forward against the
classifier's guidance gradient (forward + backward through autograd) and its forward
alone, batch 32, median of 30 calls after 5 warm-up ones. The ratio (UNet + gradient) /
UNet is what guided sampling costs over unguided, without the run-to-run noise of
whole sampling runs on a shared machine (docs/benchmarks.md, Sampling).

Run ``.venv/bin/python benchmarks/sampling_step_breakdown.py [THREADS]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling import build  # noqa: E402


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    pipe, _ = build("tiny", None, "cpu")
    b, k = 32, pipe.num_prototypes
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    x = torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    onehot = torch.nn.functional.one_hot(torch.arange(b) % k, k).float()

    def unet():
        with torch.no_grad():
            pipe.unet(x, t)

    def gradient():
        pipe._guidance_grad(x, t, None, onehot)

    def classifier_forward():
        with torch.no_grad():
            pipe.classifier.classify(x, pipe.classifier.embed_time(t.reshape(1)))

    ms = {}
    for f in (unet, gradient, classifier_forward):
        for _ in range(5):
            f()
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        ms[f.__name__] = statistics.median(ts) * 1e3
    print(f"{torch.get_num_threads()} threads, batch {b}, latents {c} x {s} x {s}: "
          + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items())
          + f"; guided step / unguided step = {(ms['unet'] + ms['gradient']) / ms['unet']:.3f}"
          + f"; guided run / unguided run (50 DDIM steps, 30 of them at t / T >= 0.4, the default) = "
          + f"{(50 * ms['unet'] + 30 * ms['gradient']) / (50 * ms['unet']):.3f}")


if __name__ == "__main__":
    main()
