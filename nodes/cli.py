"""``glass-diffusion``: run, validate and convert workflows, and list the nodes, without ComfyUI.

    glass-diffusion run WORKFLOW [--set NODE.INPUT=VALUE ...] [--models DIR] [--input DIR] [--output DIR]
                                 [--device auto|cpu|cuda] [--dtype auto|fp32|fp16|bf16]
    glass-diffusion validate WORKFLOW [--set ...] [--models DIR] [--input DIR]
    glass-diffusion convert WORKFLOW [-o OUT]
    glass-diffusion nodes [--json]

WORKFLOW is a JSON file (editor or API format) or a PNG written by a save node. NODE is a node id,
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
from pathlib import Path

from . import progress, runtime
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
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if progress.cancel_requested():
            raise KeyboardInterrupt
        print("\ncancelling at the next step (Ctrl-C again to stop now)", file=sys.stderr)
        progress.request_cancel()

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        with runtime.settings_override(models_dir=args.models, input_dir=args.input, output_dir=args.output,
                                       device=args.device, dtype=args.dtype):
            result = run_workflow(args.workflow, overrides, registry=registry, executor=Executor(registry))
    except GraphValidationError as e:
        _print_errors(e.errors)
        return INVALID
    except NodeExecutionError as e:
        print(f"error: {e}", file=sys.stderr)
        return FAILED
    except (progress.Interrupted, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return FAILED
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    for nid, ui in result.ui.items():
        print(json.dumps({"node": nid, "class_type": result.prompt[nid]["class_type"], "ui": ui}, default=str))
    return OK


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
    run = sub.add_parser("run", help="run a workflow (JSON or PNG)")
    val = sub.add_parser("validate", help="check a workflow without running it")
    for sp in (run, val):
        sp.add_argument("workflow")
        sp.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                        help="override an input (VALUE is JSON when it parses, else a string); repeatable")
        sp.add_argument("--input", metavar="DIR", help="input folder for image loaders "
                        "(default $GLASS_DIFFUSION_INPUT or ./input)")
    run.add_argument("--output", metavar="DIR", help="output folder (default $GLASS_DIFFUSION_OUTPUT or ./output)")
    run.add_argument("--device", choices=runtime.DEVICES, default=None)
    run.add_argument("--dtype", choices=runtime.DTYPES, default=None)
    conv = sub.add_parser("convert", help="convert an editor workflow to the API format")
    conv.add_argument("workflow")
    conv.add_argument("-o", "--output", dest="output_file", metavar="OUT", help="write here instead of stdout")
    nodes = sub.add_parser("nodes", help="list the node types with their inputs")
    nodes.add_argument("--json", action="store_true")
    for sp in (run, val, nodes):
        sp.add_argument("--models", metavar="DIR", help="models folder (default ./models); fills the file lists")
    return p


def main(argv: list[str] | None = None, registry: dict | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on bad arguments
    handler = {"run": _run, "validate": _validate, "convert": _convert, "nodes": _nodes}[args.command]
    try:
        return handler(args, default_registry() if registry is None else registry)
    except (OSError, ValueError, KeyError) as e:  # unreadable file, bad JSON, bad --set
        print(f"error: {e}", file=sys.stderr)
        return INVALID


if __name__ == "__main__":
    sys.exit(main())
