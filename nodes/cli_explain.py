"""``glass-diffusion explain``: which word painted which pixels, or (``--film``) how the picture formed.

    glass-diffusion explain [PROMPT] [--words W1,W2] [--threshold X] [--film [--format webp|gif] [--fps F]]
                            [--seed N] [--steps N] [--cfg X] [--width W --height H]
                            [--checkpoint NAME|PATH] [--models DIR] [--output DIR] [--device ...] [--dtype ...]

It runs the shipped attention_maps workflow (the picture and one labelled heat-map PNG per word; every word of
the prompt unless --words picks some), or with --film the shipped step_film workflow (an animated WebP or GIF
and one PNG frame per step), on the built-in model unless --checkpoint names another, and prints each file.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from . import runtime


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="attention maps per word (or --film: the picture at every step)",
                       description="Which word of the prompt painted which pixels: samples while recording the "
                                   "UNet's cross-attention and saves the picture and a labelled heat-map per word. "
                                   "--film instead saves the x0 estimate and the noisy latent of every step as an "
                                   "animation and PNG frames.")
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt (default: the workflow's, a prompt of the built-in model)")
    p.add_argument("--film", action="store_true", help="the step film instead of attention maps")
    p.add_argument("--words", default=None, help="comma-separated words to map (default: every word)")
    p.add_argument("--threshold", type=float, default=None, help="attention maps: above 0, binary masks")
    p.add_argument("--format", choices=("webp", "gif"), default=None, help="--film: the animation's format")
    p.add_argument("--fps", type=float, default=None, help="--film: frames per second")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--checkpoint", metavar="NAME|PATH", default=None,
                   help="'glass-tiny (built-in)' (default), a file name in <models>/checkpoints, or a path")
    p.add_argument("--models", metavar="DIR", help="models folder (default ./models)")
    p.add_argument("--output", metavar="DIR", help="output folder (default $GLASS_DIFFUSION_OUTPUT or ./output)")
    p.add_argument("--device", choices=runtime.DEVICES, default=None)
    p.add_argument("--dtype", choices=runtime.DTYPES, default=None)


def overrides_for(args, ckpt_name: str, tiny: bool) -> tuple:
    """(shipped workflow name, overrides) for the parsed arguments."""
    from ..sd_core import builtin
    size = builtin.RESOLUTION if tiny else 512
    common = {"Empty Latent.width": args.width or size, "Empty Latent.height": args.height or size,
              "Checkpoint.ckpt_name": ckpt_name}
    node = "Step Film" if args.film else "Attention Maps"
    cfg = args.cfg if args.cfg is not None or tiny else 7.5
    for key, value in (("seed", args.seed), ("steps", args.steps), ("cfg", cfg)):
        if value is not None:
            common[f"{node}.{key}"] = value
    if args.film:
        if args.prompt is not None:
            common["Positive.text"] = args.prompt
        if args.format is not None:
            common["Save animation.format"] = args.format
        if args.fps is not None:
            common["Save animation.fps"] = args.fps
        return "step_film", common
    if args.prompt is not None:
        common["Attention Maps.text"] = args.prompt
    if args.words is not None or args.prompt is not None:  # the workflow's own words suit its own prompt
        common["Attention Maps.words"] = args.words or ""
    if args.threshold is not None:
        common["Attention Maps.threshold"] = args.threshold
    return "attention_maps", common


def main(args, registry) -> int:
    from . import cli
    cli._check_size("--width", args.width)
    cli._check_size("--height", args.height)
    with tempfile.TemporaryDirectory(prefix="glass-diffusion-models-") as tmp:
        return _main_in(args, registry, Path(tmp))


def _main_in(args, registry, tmp: Path) -> int:
    from ..sd_core import builtin
    from . import cli, example_workflows, paths
    from .executor import run_workflow
    ckpt_name, models = cli._checkpoint_choice(args.checkpoint, args.models, tmp)
    tiny = ckpt_name == builtin.NAME
    if args.prompt is None and not tiny:
        print("error: give a prompt (the workflow's prompt is for the built-in model only)", file=sys.stderr)
        return cli.INVALID
    name, overrides = overrides_for(args, ckpt_name, tiny)
    shipped = example_workflows.WORKFLOWS_DIR / "api" / f"{name}.json"
    workflow = (json.loads(shipped.read_text(encoding="utf-8")) if shipped.is_file()
                else example_workflows.build(name, registry).api())
    written = []

    def job():
        with runtime.settings_override(models_dir=models, output_dir=args.output, device=args.device,
                                       dtype=args.dtype):
            out_dir = paths.output_dir()
            result = run_workflow(workflow, overrides, registry=registry)
            for ui in result.ui.values():
                for img in ui.get("images", []):
                    if img.get("type") == "output":
                        path = out_dir / img.get("subfolder", "") / img["filename"]
                        written.append(path)
                        print(path, flush=True)

    t0 = time.perf_counter()
    rc = cli._guarded(job)
    if rc == cli.OK:
        print(f"{len(written)} file{'s' * (len(written) != 1)} in {time.perf_counter() - t0:.1f} s ({ckpt_name})",
              file=sys.stderr)
    return rc
