"""Probe: does maximising Wen et al.'s text-conditional noise norm over conditionings find memorized images?

A reference-free robust step would need conditionings that trigger memorized images the user did not list. This
probe starts from ``--starts`` conditionings (random directions at the norms of ordinary prompts' tokens, or the
ordinary prompts themselves), maximises the noise norm ``||f(x_T, t, c) - f(x_T, t, uncond)||^2`` at the sampler's
first timesteps with Adam (each token kept at its starting norm), then generates from the result and scores every
generation against every memorized training image of the manifest (``locate`` and ``heldout``).

It prints the noise norm of the memorized and ordinary prompts (for scale), the norm along the optimisation, and
per start the closest memorized image and its similarity (replication at the scorer's threshold)::

    python benchmarks/probe_noise_norm_triggers.py --model tiny-sd-memorizer --starts 8 --steps 30 --init prompt
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from _probe import open_model, probe_parser

logger = logging.getLogger("probe_noise_norm_triggers")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = probe_parser(__doc__, edit=False)
    p.add_argument("--starts", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--init", choices=["random", "prompt"], default="random")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--draws", type=int, default=4, help="noise draws per start and step")
    p.add_argument("--scorer", default="ssim")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from diffmem.data import load_reference
    from diffmem.objective import denoiser_call, encode_conditioning, initial_conditioning
    from diffmem.reextraction import ReextractConfig
    from diffmem.sampling import generate_images, image_size
    from diffmem.score import get_scorer
    from diffmem.targets import get_denoiser

    _, pipe, sampler, entries = open_model(args)
    memorized = [e for e in entries if e.split in ("locate", "heldout") and e.reference is not None]
    ordinary = [e.prompt for e in entries if e.split == "nonmem"]
    h, w = image_size(pipe)
    refs = [load_reference(e, (h, w)) for e in memorized]
    scorer = get_scorer(args.scorer)
    denoiser = get_denoiser(pipe)
    for p in denoiser.parameters():
        p.requires_grad_(False)
    predict = denoiser_call(pipe, h, w)
    uncond, _ = encode_conditioning(pipe, [""])
    pipe.scheduler.set_timesteps(sampler.num_inference_steps)
    first = pipe.scheduler.timesteps[:3]
    side = (h // pipe.vae_scale_factor, w // pipe.vae_scale_factor)
    channels = int(denoiser.config.in_channels)
    gen = torch.Generator().manual_seed(0)

    def norm(cond: torch.Tensor, draws: int, generator: torch.Generator) -> torch.Tensor:
        n = cond.shape[0]
        x = torch.randn((n * draws, channels, *side), generator=generator)
        t = first[torch.randint(0, len(first), (n * draws,), generator=generator)]
        diff = predict(x, t, cond.repeat_interleave(draws, 0), None) - predict(x, t, uncond.expand(n * draws, -1, -1),
                                                                               None)
        return diff.pow(2).reshape(n, draws, -1).mean(dim=(1, 2))

    with torch.no_grad():
        for label, prompts in (("memorized", [e.prompt for e in memorized]), ("ordinary", ordinary)):
            d = norm(encode_conditioning(pipe, prompts)[0], args.draws, torch.Generator().manual_seed(5))
            logger.info("noise norm of the %s prompts: mean %.3f, range %.3f-%.3f", label, float(d.mean()),
                        float(d.min()), float(d.max()))
    starts = [ordinary[i % len(ordinary)] for i in range(args.starts)]
    c0, _ = initial_conditioning(pipe, starts, ReextractConfig(init=args.init, seed=0))
    token_norms = c0.norm(dim=-1, keepdim=True)
    cond = c0.clone().requires_grad_(True)
    opt = torch.optim.Adam([cond], lr=args.lr)
    with torch.enable_grad():
        for step in range(args.steps + 1):
            d = norm(cond, args.draws, gen)
            shown = float(d.detach().mean())
            if step % 10 == 0 or step == args.steps:
                logger.info("step %d: noise norm %.3f", step, shown)
            if step == args.steps:
                break
            opt.zero_grad()
            (-d.sum()).backward()
            opt.step()
            with torch.no_grad():
                cond.mul_(token_norms / cond.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    images = generate_images(pipe, None, num_seeds=2, seed=0, prompt_embeds=cond.detach(), sampler=sampler,
                             progress=False)
    sims = scorer.similarity(list(images.reshape(-1, h, w, 3)), refs).numpy().reshape(args.starts, 2, -1)
    threshold = scorer.describe().get("threshold")
    found = 0
    for i in range(args.starts):
        best = sims[i].max(axis=0)
        k = int(best.argmax())
        hit = threshold is not None and best[k] >= threshold
        found += int(hit)
        print(f"start {i}: closest memorized image {memorized[k].prompt!r} ({memorized[k].split}) "  # noqa: T201
              f"similarity {best[k]:.3f}{' REPLICATED' if hit else ''}")
    print(f"triggers found: {found} of {args.starts} (threshold {threshold})")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
