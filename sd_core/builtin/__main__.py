"""Make a few pictures with the built-in model: `python -m glass_diffusion.sd_core.builtin [--out DIR] [PROMPT ...]`.

Needs no download: the checkpoint and its vocabulary ship with the package. Writes one PNG per prompt.
"""
import argparse
import re
import time
from pathlib import Path


def main(argv=None) -> list:
    from . import DEFAULTS, EXAMPLE_PROMPTS, load

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("prompts", nargs="*", help=f"prompts in the toy grammar (default: {len(EXAMPLE_PROMPTS)} examples)")
    p.add_argument("--out", type=Path, default=Path("output"), help="folder for the PNGs (default ./output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--cfg", type=float, default=DEFAULTS["cfg"])
    p.add_argument("--scale", type=int, default=4, help="also upscale the 64x64 pictures this many times (nearest)")
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    from ..sampling import txt2img

    t0 = time.time()
    model, tok = load(dtype=torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(args.prompts or EXAMPLE_PROMPTS):
        with torch.no_grad():
            img = txt2img(model, tok, prompt, width=DEFAULTS["width"], height=DEFAULTS["height"],
                          seed=args.seed + i, steps=args.steps, cfg=args.cfg, sampler_name=DEFAULTS["sampler_name"],
                          scheduler=DEFAULTS["scheduler"])[0]
        pil = Image.fromarray((img.clamp(0, 1) * 255).round().byte().numpy())
        if args.scale > 1:
            pil = pil.resize((pil.width * args.scale, pil.height * args.scale), Image.NEAREST)
        path = args.out / f"glass_tiny_{i:02d}_{re.sub(r'[^a-z0-9]+', '_', prompt.lower()).strip('_')[:60]}.png"
        pil.save(path)
        written.append(path)
        print(path)
    print(f"{len(written)} pictures in {time.time() - t0:.1f} s")
    return written


if __name__ == "__main__":
    main()
