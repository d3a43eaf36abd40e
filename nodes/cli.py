"""``glass-diffusion``: make pictures, run, validate and convert workflows, and list the nodes, without ComfyUI.

    glass-diffusion generate [PROMPT ...] [--seed N] [--steps N] [--cfg X] [--width W --height H]
                             [--checkpoint NAME|PATH] [--models DIR] [--output DIR] [--device ...] [--dtype ...]
    glass-diffusion run WORKFLOW [--set NODE.INPUT=VALUE ...] [--models DIR] [--input DIR] [--output DIR]
                                 [--device auto|cpu|cuda] [--dtype auto|fp32|fp16|bf16]
    glass-diffusion validate WORKFLOW [--set ...] [--models DIR] [--input DIR]
    glass-diffusion convert WORKFLOW [-o OUT]
    glass-diffusion workflows
    glass-diffusion nodes [--json]
    glass-diffusion bench [--device cpu|cuda] [--comfyui DIR --comfyui-python PY] [--glass VARIANTS] [--json OUT]
    glass-diffusion grid WORKFLOW --x NODE.INPUT=VALUES [--y ...] [--z ...] [--ray [ADDRESS]]  (see nodes/grid.py)
    glass-diffusion explain [PROMPT] [--words W,...] [--film]  (attention maps / step film, nodes/cli_explain.py)

`generate` runs the shipped text_to_image workflow once per prompt, on the built-in model "glass-tiny (built-in)"
unless --checkpoint names another (a file in <models>/checkpoints, or a path), and prints each PNG's path with
the seed and prompt it shows. WORKFLOW is a JSON file (editor or API format), a PNG written by a save node, or
the name of a shipped workflow (`glass-diffusion workflows` lists them). NODE is a node id,
a title, or a class_type used once. Exit codes: 0 done, 2 invalid graph or arguments, 1 failed run.
The first Ctrl-C cancels at the next step; a second one stops at once. A run writes its files only when it
succeeds: a failed or cancelled run leaves nothing in the output folder (see nodes/outputs.py).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from . import bench, cli_explain, grid, notes, progress, runtime
from .executor import Executor, GraphValidationError, NodeExecutionError, run_workflow, validate_workflow
from .workflow import default_registry, input_specs, load_workflow, parse_value, to_api

OK, FAILED, INVALID = 0, 1, 2


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected NODE.INPUT=VALUE")
        out[key] = parse_value(value)
    return out


def _print_errors(errors) -> None:
    print(f"invalid workflow ({len(errors)} problem{'s' * (len(errors) != 1)}):", file=sys.stderr)
    for e in errors:
        print(f"  {e}", file=sys.stderr)


def _run(args, registry) -> int:
    overrides = _parse_sets(args.set)
    results = []

    def job():
        with runtime.settings_override(models_dir=args.models, input_dir=args.input, output_dir=args.output,
                                       device=args.device, dtype=args.dtype, allow_nan=args.allow_nan or None):
            results.append(run_workflow(args.workflow, overrides, registry=registry,
                                        executor=Executor(registry, keep=False)))  # a model is freed after its last use

    rc = _guarded(job)
    if rc != OK:
        return rc
    result = results[0]
    for nid, ui in result.ui.items():
        print(json.dumps({"node": nid, "class_type": result.prompt[nid]["class_type"], "ui": ui}, default=str))
    return OK


def _guarded(job) -> int:
    """Run job() with the two-step Ctrl-C handling; the exit code for how it ended."""
    previous = signal.getsignal(signal.SIGINT)
    cancel = threading.Event()  # this command's runs' cancel flag (progress.cancel_scope)

    announced = []

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        print("\ncancelling at the next step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)
        announced.append(True)
        cancel.set()

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        with progress.cancel_scope(cancel):
            job()
    except GraphValidationError as e:
        _print_errors(e.errors)
        return INVALID
    except NodeExecutionError as e:
        print(f"error: {e}", file=sys.stderr)
        return FAILED
    except (progress.Interrupted, KeyboardInterrupt):
        if not announced:  # one line per interruption: the Ctrl-C handler already said it
            print("interrupted", file=sys.stderr)
        return FAILED
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return OK


GENERATE_WORKFLOW = "text_to_image"


def _checkpoint_choice(value: str | None, models: str | None, tmp: Path):
    """(ckpt_name, models folder to use) for --checkpoint: the built-in model, a name in <models>/checkpoints,
    or a path to a model file (linked, with its <stem>.tokenizer/ folder if any, into a models folder in tmp)."""
    from ..sd_core import builtin
    from . import loaders, paths
    if value is None or builtin.is_builtin(value):
        return builtin.NAME, models
    path = Path(value).expanduser()
    with runtime.settings_override(models_dir=models):
        if paths.full_path("checkpoints", value) is not None:
            return value, models
        if not path.is_file():
            raise ValueError(f"--checkpoint {value!r}: no such file; {loaders.missing_checkpoint(value)}")
    if path.suffix.lower() not in paths.MODEL_EXTENSIONS:
        raise ValueError(f"--checkpoint {value!r}: not a checkpoint file (expected one of "
                         f"{', '.join(paths.MODEL_EXTENSIONS)})")
    path = path.resolve()
    folder = tmp / "checkpoints"
    folder.mkdir(parents=True)
    (folder / path.name).symlink_to(path)
    tokenizer = path.with_name(path.stem + ".tokenizer")
    if tokenizer.is_dir():
        (folder / tokenizer.name).symlink_to(tokenizer, target_is_directory=True)
    return path.name, tmp


def _check_size(option: str, value: int | None) -> None:
    if value is not None and (value < 8 or value % 8):
        lower, upper = max(8, value // 8 * 8), max(8, -(-value // 8) * 8)
        sizes = f"{lower}" if lower == upper else f"{lower} or {upper}"
        raise ValueError(f"{option} {value}: must be a multiple of 8 pixels (the latent is 1/8 of the picture): "
                         f"try {sizes}")


def _generate(args, registry) -> int:
    import tempfile
    _check_size("--width", args.width)
    _check_size("--height", args.height)
    with tempfile.TemporaryDirectory(prefix="glass-diffusion-models-") as tmp:
        return _generate_in(args, registry, Path(tmp))


def _generate_in(args, registry, tmp: Path) -> int:
    from ..sd_core import builtin
    from . import example_workflows, paths
    ckpt_name, models = _checkpoint_choice(args.checkpoint, args.models, tmp)
    tiny = ckpt_name == builtin.NAME
    prompts = args.prompts or (list(builtin.EXAMPLE_PROMPTS) if tiny else [])
    if not prompts:
        print("error: give a prompt (the example prompts are for the built-in model only)", file=sys.stderr)
        return INVALID
    shipped = example_workflows.WORKFLOWS_DIR / "api" / f"{GENERATE_WORKFLOW}.json"
    workflow = (json.loads(shipped.read_text(encoding="utf-8")) if shipped.is_file()
                else example_workflows.build(GENERATE_WORKFLOW, registry).api())
    size = builtin.RESOLUTION if tiny else 512  # the workflow's size suits the built-in model; SD 1.5 wants 512
    overrides = {"Checkpoint.ckpt_name": ckpt_name, "Empty Latent.width": args.width or size,
                 "Empty Latent.height": args.height or size}
    for key, value in (("Sampler.seed", args.seed), ("Sampler.steps", args.steps),
                       ("Sampler.cfg", args.cfg if args.cfg is not None or tiny else 7.5)):
        if value is not None:
            overrides[key] = value
    written = []

    def job():
        executor = Executor(registry)  # one executor: the checkpoint is loaded once for all prompts
        with runtime.settings_override(models_dir=models, output_dir=args.output, device=args.device,
                                       dtype=args.dtype):
            out_dir = paths.output_dir()
            for i, prompt in enumerate(prompts, 1):
                if len(prompts) > 1:
                    print(f"[{i}/{len(prompts)}] {prompt}", file=sys.stderr, flush=True)
                result = run_workflow(workflow, {**overrides, "Positive.text": prompt}, registry=registry,
                                      executor=executor)
                ran = {n["_meta"]["title"]: n["inputs"] for n in result.prompt.values() if "_meta" in n}
                for ui in result.ui.values():
                    for img in ui.get("images", []):
                        if img.get("type") == "output":
                            path = out_dir / img.get("subfolder", "") / img["filename"]
                            written.append(path)
                            # what the picture shows, from the graph that ran
                            print(f"{path}  seed {ran['Sampler']['seed']}  {json.dumps(ran['Positive']['text'])}",
                                  flush=True)

    t0 = time.perf_counter()
    rc = _guarded(job)
    if rc == OK:
        print(f"{len(written)} picture{'s' * (len(written) != 1)} in {time.perf_counter() - t0:.1f} s "
              f"({ckpt_name})", file=sys.stderr)
    return rc


def _validate(args, registry) -> int:
    with runtime.settings_override(models_dir=args.models, input_dir=args.input):
        errors = validate_workflow(args.workflow, _parse_sets(args.set), registry)
    if errors:
        _print_errors(errors)
        return INVALID
    print("ok")
    return OK


def _convert(args, registry) -> int:
    api, _ = to_api(load_workflow(args.workflow), registry)
    unknown = sorted({n["class_type"] for n in api.values() if n["class_type"] not in registry})
    if unknown:
        print(f"cannot convert: unknown node types {', '.join(unknown)}", file=sys.stderr)
        return INVALID
    text = json.dumps(api, indent=2) + "\n"
    if args.output_file:
        Path(args.output_file).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return OK


def _workflows(args, registry) -> int:
    """The shipped workflows: name, what it needs, what it shows."""
    from . import example_workflows, shipped
    for name in shipped.workflow_names():
        fn = example_workflows.WORKFLOWS.get(name)
        needs = example_workflows.USER_FILES.get(name)
        need = ("needs " + ", ".join(f"{folder}/{file} ({what})" for folder, file, what in needs)) if needs \
            else "runs as shipped (built-in model)"
        print(f"{name}\n    {' '.join(fn.__doc__.split()) if fn and fn.__doc__ else ''}\n    {need}")
    print(f"\nrun one: glass-diffusion run NAME  (files: {shipped.WORKFLOWS_DIR})")
    return OK


def _describe(cls) -> dict:
    inputs = {}
    for name, spec in input_specs(cls).items():
        if spec.category == "hidden":
            continue
        entry = {"type": spec.type_name, "required": spec.category == "required"}
        if spec.combo is not None:
            entry["options"] = spec.combo
        entry.update({k: spec.options[k] for k in ("default", "min", "max") if k in spec.options})
        inputs[name] = entry
    outputs = [t if isinstance(t, str) else "COMBO" for t in cls.RETURN_TYPES]
    return {"inputs": inputs, "outputs": outputs, "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


def _nodes(args, registry) -> int:
    with runtime.settings_override(models_dir=args.models):
        info = {nid: _describe(cls) for nid, cls in sorted(registry.items())}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return OK
    for nid, d in info.items():
        print(f"{nid}{'  [output]' if d['output_node'] else ''}")
        for name, i in d["inputs"].items():
            extra = ", ".join(f"{k}={i[k]!r}" for k in ("default", "min", "max") if k in i)
            typ = f"COMBO {i['options'][:8]}{'...' if len(i['options']) > 8 else ''}" if "options" in i else i["type"]
            print(f"    {name}: {typ}{'' if i['required'] else ' (optional)'}{'  ' + extra if extra else ''}")
        print(f"    -> {', '.join(d['outputs']) or '(none)'}")
    return OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glass-diffusion", description="Run Glass Diffusion workflows headless.")
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="make pictures from prompts (built-in model by default)",
                         description="Run the shipped text_to_image workflow once per prompt and print the PNG "
                                     "paths. With no --checkpoint it uses the built-in model 'glass-tiny "
                                     "(built-in)', which knows simple shape prompts such as 'a red circle in the "
                                     "center on a blue background' and works at 64x64.")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT",
                     help="one picture per prompt (default: a few example prompts of the built-in model)")
    gen.add_argument("--seed", type=int, default=None, help="noise seed for every prompt (default: the workflow's)")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: the workflow's, 20)")
    gen.add_argument("--cfg", type=float, default=None, help="guidance scale (default 2 for the built-in model, "
                     "7.5 for others)")
    gen.add_argument("--width", type=int, default=None, help="pixels (default 64 for the built-in model, 512 for others)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--checkpoint", metavar="NAME|PATH", default=None,
                     help="'glass-tiny (built-in)' (default), a file name in <models>/checkpoints, or a path")
    gen.add_argument("--output", metavar="DIR", help="output folder (default $GLASS_DIFFUSION_OUTPUT or ./output)")
    gen.add_argument("--device", choices=runtime.DEVICES, default=None)
    gen.add_argument("--dtype", choices=runtime.DTYPES, default=None)
    run = sub.add_parser("run", help="run a workflow (JSON or PNG)")
    val = sub.add_parser("validate", help="check a workflow without running it")
    for sp in (run, val):
        sp.add_argument("workflow", help="a JSON file (editor or API format), a PNG saved by a save node, or the "
                        "name of a shipped workflow (see `glass-diffusion workflows`)")
        sp.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                        help="override an input (VALUE is JSON when it parses, else a string); repeatable")
        sp.add_argument("--input", metavar="DIR", help="input folder for image loaders "
                        "(default $GLASS_DIFFUSION_INPUT or ./input)")
    run.add_argument("--output", metavar="DIR", help="output folder (default $GLASS_DIFFUSION_OUTPUT or ./output)")
    run.add_argument("--device", choices=runtime.DEVICES, default=None)
    run.add_argument("--dtype", choices=runtime.DTYPES, default=None)
    run.add_argument("--allow-nan", action="store_true", help="debugging: let NaN / inf UNet or VAE outputs "
                     "through instead of stopping the run")
    conv = sub.add_parser("convert", help="convert an editor workflow to the API format")
    conv.add_argument("workflow")
    conv.add_argument("-o", "--output", dest="output_file", metavar="OUT", help="write here instead of stdout")
    sub.add_parser("workflows", help="list the shipped workflows (run one by name: glass-diffusion run NAME)")
    nodes = sub.add_parser("nodes", help="list the node types with their inputs")
    nodes.add_argument("--json", action="store_true")
    bench.add_parser(sub)
    cli_explain.add_parser(sub)
    for sp in (gen, run, val, nodes):
        sp.add_argument("--models", metavar="DIR", help="models folder (default ./models); fills the file lists")
    grid.add_parser(sub)
    return p


def _load_registry() -> dict:
    """The node registry, imported with Ctrl-C only noted until the imports are done, then raised as
    KeyboardInterrupt. A KeyboardInterrupt raised inside an extension module's import is not safe: torch's C++
    start-up imports numpy and clears any error, so an interrupt there was swallowed (the run then went on as if
    nothing happened) or left numpy half-imported ("cannot load module more than once")."""
    if threading.current_thread() is not threading.main_thread():
        return default_registry()
    noted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        registry = default_registry()
    finally:
        signal.signal(signal.SIGINT, previous)
    if noted:
        raise KeyboardInterrupt
    return registry


def main(argv: list[str] | None = None, registry: dict | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # exits 2 on bad arguments
        handler = {"generate": _generate, "run": _run, "validate": _validate, "convert": _convert,
                   "nodes": _nodes, "workflows": _workflows, "bench": lambda a, _registry: bench.main(a),
                   "grid": grid.main, "explain": cli_explain.main}[args.command]
        notes.print_to_stderr()  # what nodes did on their own (a size rounded, unknown prompt words): "note: ..."
        lines = progress.plain_lines.set(True)  # a plain line per step when stderr is not a terminal
        try:
            return handler(args, _load_registry() if registry is None else registry)
        except GraphValidationError as e:  # e.g. a malformed editor file met by convert
            _print_errors(e.errors)
            return INVALID
        except (OSError, ValueError, KeyError) as e:  # unreadable file, bad JSON, bad --set
            print(f"error: {e}", file=sys.stderr)
            return INVALID
        finally:
            progress.plain_lines.reset(lines)
    except KeyboardInterrupt:  # Ctrl-C outside a run (loading torch, reading files): one line, exit 1
        print("interrupted", file=sys.stderr)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
