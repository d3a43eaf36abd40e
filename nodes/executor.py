"""Headless graph executor for API-format workflows of V1 node classes (no SD knowledge here).

``run_workflow`` loads a workflow (API/UI JSON, dict or PNG), converts it to the API format,
validates the whole graph (every problem, ComfyUI's node_errors style), then runs what the output
nodes (OUTPUT_NODE) need, in dependency order, the output nodes themselves last (so a failure in the
work they need wastes no saving). An ``Executor`` caches node outputs between runs by a signature of
class, inputs, upstream signatures and IS_CHANGED, so only changed nodes rerun.
Each run is one output transaction (nodes/outputs.py): files the nodes save appear only when every node
succeeded and no cancel was requested; a failed or interrupted run leaves no file behind.
Lists follow ComfyUI: each output is a list; a node without INPUT_IS_LIST is called once per item.
Lazy inputs, node expansion and ExecutionBlocker are not supported.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import outputs as output_files
from . import progress
from .validation import (GraphError, GraphValidationError, class_hook, is_link, links_of, topological_order,
                         validate_api)
from .workflow import (OverrideError, Workflow, apply_overrides, apply_overrides_ui, as_workflow, default_registry,
                       input_specs, load_workflow, to_api)

__all__ = ["Executor", "RunResult", "run_workflow", "validate_workflow", "GraphError", "GraphValidationError",
           "NodeExecutionError"]


# ----------------------------------------------------------------------------- results


class NodeExecutionError(RuntimeError):
    """A node's function raised; the original exception is ``__cause__``, finished work is ``partial``."""

    def __init__(self, node_id: str, class_type: str, error: BaseException, partial: "RunResult"):
        self.node_id, self.class_type, self.error, self.partial = node_id, class_type, error, partial
        super().__init__(f"node {node_id} ({class_type}) failed: {type(error).__name__}: {error}")


@dataclass
class RunResult:
    """``outputs[id]``: one list per output slot (ComfyUI's list semantics); ``ui[id]``: ui dicts."""
    prompt: dict
    outputs: dict[str, tuple] = field(default_factory=dict)
    ui: dict[str, dict] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)  # run this time (the rest came from the cache)

    def output(self, node_id, index: int = 0) -> Any:
        """The value of one output slot; a list when the node produced several items."""
        items = self.outputs[str(node_id)][index]
        return items[0] if len(items) == 1 else items


# ----------------------------------------------------------------------------- execution

class Executor:
    """Runs API graphs; keeps node outputs and node objects between runs (one process, one Executor).

    ``keep=False`` (the command line's single runs): nothing is kept for a next run, and a node's outputs are
    released as soon as the last node that uses them has run, so a model the rest of the graph does not need
    (a text encoder once the prompts are encoded, a first checkpoint once its part is done) frees its memory
    during the run. The RunResult then holds the outputs of the output nodes only."""

    def __init__(self, registry: dict | None = None, keep: bool = True):
        self.registry = default_registry() if registry is None else registry
        self.keep = keep
        self.cache: dict[str, tuple] = {}   # signature -> (outputs, ui)
        self.objects: dict[tuple, Any] = {}  # (node id, class_type) -> node instance

    def validate(self, api: dict) -> list[GraphError]:
        return validate_api(api, self.registry)[1]

    def run(self, api: dict, extra_pnginfo: dict | None = None, cancel=None) -> RunResult:
        """Validate, then execute what the output nodes need. Raises GraphValidationError,
        NodeExecutionError (node id, type, original message) or progress.Interrupted.

        ``cancel``: a ``threading.Event`` that cancels this run when set (from any thread); by default the
        caller's progress.cancel_scope if one is open, else a new flag of this run alone."""
        api, errors, outputs = validate_api(api, self.registry)
        if errors:
            raise GraphValidationError(errors)
        if cancel is None and progress.in_cancel_scope():
            cancel = progress.cancel_event()
        with progress.cancel_scope(cancel):
            return self._run(api, outputs, extra_pnginfo)

    def _run(self, api: dict, outputs: list[str], extra_pnginfo) -> RunResult:
        result, signatures, used = RunResult(prompt=api), {}, {}
        staged: dict[str, str] = {}  # node id -> signature, for nodes that saved files this run
        order = self._order(api, outputs)
        uses = {}  # node id -> how many nodes still to run take one of its outputs
        for nid in order:
            for _, src in links_of(api[nid]):
                uses[src] = uses.get(src, 0) + 1
        try:
            with output_files.transaction() as txn:  # commits at the end of the block, else rolls back
                for nid in order:
                    sig = self._signature(nid, api, signatures)
                    hit = self.cache.get(sig)
                    if hit is None:  # (_call checks for cancellation before each call)
                        before = len(txn)
                        hit = self.cache[sig] = self._execute(nid, api, result, extra_pnginfo)
                        result.executed.append(nid)
                        if len(txn) > before:
                            staged[nid] = sig
                    used[sig] = hit
                    result.outputs[nid] = hit[0]
                    if hit[1]:
                        result.ui[nid] = hit[1]
                    if not self.keep:
                        self._release_inputs(nid, api, uses, outputs, signatures, used, result)
                progress.check_cancel()  # a cancel during the last node: still nothing written
        except BaseException:
            for nid, sig in staged.items():  # their files are gone: rerun them next time, report no names
                self.cache.pop(sig, None)
                result.ui.pop(nid, None)
            raise
        self.cache = used if self.keep else {}  # keep what this graph uses (big models are not kept forever)
        return result

    def _release_inputs(self, nid, api, uses, outputs, signatures, used, result) -> None:
        """keep=False: drop the outputs of nid's inputs that no node still to run needs."""
        for _, src in links_of(api[nid]):
            uses[src] -= 1
            if uses[src] == 0 and src not in outputs:
                result.outputs.pop(src, None)
                used.pop(signatures[src], None)
                self.cache.pop(signatures[src], None)

    def _order(self, api: dict, outputs: list[str]) -> list[str]:
        """Dependency order: first everything the output nodes need, then the output nodes not yet placed
        (an iterative walk: a chain of any length is fine)."""
        return topological_order(api, [src for nid in outputs for _, src in links_of(api[nid])] + list(outputs))

    def _signature(self, nid: str, api: dict, memo: dict) -> str:
        """Hash of class, IS_CHANGED, inputs and upstream signatures (memoized per run; the upstream ones are
        computed first, in dependency order, so nothing recurses)."""
        if nid in memo:
            return memo[nid]
        for src in topological_order(api, [nid])[:-1]:
            if src not in memo:
                memo[src] = self._own_signature(src, api, memo)
        memo[nid] = self._own_signature(nid, api, memo)
        return memo[nid]

    def _own_signature(self, nid: str, api: dict, memo: dict) -> str:
        node = api[nid]
        cls = self.registry[node["class_type"]]
        specs = input_specs(cls)
        parts = [node["class_type"], self._is_changed(cls, node["inputs"])]
        hidden = {s.type for s in specs.values() if s.category == "hidden"}
        if getattr(cls, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden:
            parts.append(nid)
        for name in sorted(node["inputs"]):
            v = node["inputs"][name]
            parts.append([name, ["LINK", memo[str(v[0])], v[1]] if is_link(v) else v])
        text = json.dumps(parts, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    def _is_changed(self, cls, inputs: dict) -> Any:
        fn = class_hook(cls, "IS_CHANGED")
        if fn is None:
            return None
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        try:
            value = fn(**{k: (None if is_link(v) else v) for k, v in inputs.items() if k in params or takes_all})
        except Exception:
            value = math.nan
        if isinstance(value, float) and math.isnan(value):
            return uuid.uuid4().hex  # NaN: never equal, so always rerun (as ComfyUI)
        return value

    def _execute(self, nid: str, api: dict, result: RunResult, extra_pnginfo) -> tuple:
        node = api[nid]
        ct = node["class_type"]
        cls = self.registry[ct]
        hidden = {"PROMPT": api, "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": nid}
        args = {}
        for name, spec in input_specs(cls).items():
            if spec.category == "hidden":
                args[name] = [hidden.get(spec.type)]
            elif name in node["inputs"]:
                v = node["inputs"][name]
                args[name] = result.outputs[v[0]][v[1]] if is_link(v) else [v]
        try:
            key = (nid, ct)
            if key not in self.objects:
                self.objects[key] = cls()
            outputs = _call(cls, getattr(self.objects[key], cls.FUNCTION), args)
            _check_finite(ct, cls, outputs[0])
            return outputs
        except progress.Interrupted:
            raise
        except Exception as e:
            if type(e).__name__ == "InterruptProcessingException":  # ComfyUI's cancel
                raise
            raise NodeExecutionError(nid, ct, e, result) from e


def _tensors(value, depth: int = 0):
    """Float tensors in a node output: a tensor, or inside dicts / lists / tuples (LATENT, CONDITIONING)."""
    torch = sys.modules.get("torch")
    if torch is None or depth > 3:
        return
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)


def _check_finite(ct: str, cls, outputs: tuple) -> None:
    """A node output holding NaN / inf stops the run (a blank picture is not a result), unless --allow-nan."""
    names = tuple(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
    for slot, items in enumerate(outputs):
        for t in _tensors(items):
            progress.check_finite(ct, f"output {slot} ({names[slot] if slot < len(names) else '?'})", t)


def _call(cls, fn, args: dict) -> tuple:
    """Call a node function over list inputs; returns (outputs: tuple of lists, ui dict or None)."""
    if getattr(cls, "INPUT_IS_LIST", False):
        calls = [args]
    else:
        n = 0 if any(len(v) == 0 for v in args.values()) else max((len(v) for v in args.values()), default=1)
        calls = [{k: v[min(i, len(v) - 1)] for k, v in args.items()} for i in range(n)]
    types = tuple(cls.RETURN_TYPES)
    as_list = tuple(getattr(cls, "OUTPUT_IS_LIST", None) or (False,) * len(types))
    outputs, ui = [[] for _ in types], {}
    for kwargs in calls:
        progress.check_cancel()
        ret = fn(**kwargs)
        if isinstance(ret, dict):
            for k, v in (ret.get("ui") or {}).items():
                ui.setdefault(k, []).extend(v if isinstance(v, (list, tuple)) else [v])
            ret = ret.get("result", ())
        ret = () if ret is None else ret
        if not isinstance(ret, (tuple, list)) or len(ret) != len(types):
            raise TypeError(f"{cls.__name__}.{cls.FUNCTION} returned {type(ret).__name__} "
                            f"{'of length ' + str(len(ret)) if isinstance(ret, (tuple, list)) else ''}"
                            f", expected a tuple of {len(types)} output(s)")
        for i, value in enumerate(ret):
            outputs[i].extend(value) if as_list[i] else outputs[i].append(value)
    return tuple(outputs), (ui or None)


# ----------------------------------------------------------------------------- public API

def _prepare(workflow, overrides, registry) -> tuple[dict, dict | None]:
    wf = load_workflow(workflow) if isinstance(workflow, (str, Path)) else as_workflow(workflow)
    api, pnginfo = to_api(wf, registry)
    try:
        changes = apply_overrides(api, overrides, registry)
    except OverrideError as e:
        raise GraphValidationError([e.graph_error()]) from None
    if changes and pnginfo:  # keep the embedded editor workflow in step with the graph that runs
        pnginfo = {"workflow": apply_overrides_ui(pnginfo["workflow"], changes, registry)}
    return api, pnginfo


def validate_workflow(workflow, overrides: dict | None = None, registry: dict | None = None) -> list[GraphError]:
    """Every problem in a workflow (dict in either format, Workflow, JSON or PNG path); [] if valid."""
    registry = default_registry() if registry is None else registry
    try:
        api, _ = _prepare(workflow, overrides, registry)
    except GraphValidationError as e:
        return e.errors
    return validate_api(api, registry)[1]


def run_workflow(workflow: dict | str | Path | Workflow, overrides: dict | None = None,
                 registry: dict | None = None, executor: Executor | None = None) -> RunResult:
    """Load, convert, override (``{"NODE.INPUT": value}``), validate and run a workflow.

    Pass the same ``executor`` to reuse cached node outputs between runs.
    """
    executor = executor or Executor(registry)
    api, pnginfo = _prepare(workflow, overrides, executor.registry)
    return executor.run(api, pnginfo)
