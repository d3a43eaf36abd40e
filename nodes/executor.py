"""Headless graph executor for API-format workflows of V1 node classes (no SD knowledge here).

``run_workflow`` loads a workflow (API/UI JSON, dict or PNG), converts it to the API format,
validates the whole graph (every problem, ComfyUI's node_errors style), then runs what the output
nodes (OUTPUT_NODE) need, in dependency order. An ``Executor`` caches node outputs between runs by
a signature of class, inputs, upstream signatures and IS_CHANGED, so only changed nodes rerun.
Lists follow ComfyUI: each output is a list; a node without INPUT_IS_LIST is called once per item.
Lazy inputs, node expansion and ExecutionBlocker are not supported.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import progress
from .workflow import (InputSpec, Workflow, apply_overrides, apply_overrides_ui, as_workflow, default_registry,
                       input_specs, load_workflow, to_api)

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# ----------------------------------------------------------------------------- errors and results

@dataclass
class GraphError:
    """One problem found in a graph; ``kind`` follows ComfyUI's error types where one exists."""
    kind: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    input_name: str | None = None

    def __str__(self) -> str:
        where = f"node {self.node_id} ({self.class_type})" if self.node_id is not None else "graph"
        if self.input_name:
            where += f" input '{self.input_name}'"
        return f"{where}: {self.message}"


class GraphValidationError(ValueError):
    """The graph is invalid; ``errors`` lists every problem."""

    def __init__(self, errors: list[GraphError]):
        self.errors = list(errors)
        super().__init__("invalid workflow:\n" + "\n".join(f"  {e}" for e in self.errors))


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


# ----------------------------------------------------------------------------- validation

def is_link(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def types_match(received: Any, spec: InputSpec) -> bool:
    """Output type vs input type: "*" matches anything, "A,B" unions overlap, COMBO takes lists."""
    if spec.combo is not None:
        return isinstance(received, (list, tuple)) or received in ("COMBO", "*")
    if isinstance(received, (list, tuple)):
        return spec.type == "*"
    got = {t.strip() for t in str(received).split(",")}
    want = {t.strip() for t in str(spec.type).split(",")}
    return "*" in got or "*" in want or bool(got & want)


def _coerce(value: Any, spec: InputSpec) -> Any:
    """A widget value converted to its type; ValueError when it cannot be."""
    kind, bad = spec.type_name, ValueError(f"expected {spec.type_name}, got {type(value).__name__} {value!r}")
    if kind == "COMBO":
        if isinstance(value, (dict, list)):
            raise bad
        return value
    if isinstance(value, (dict, list, tuple)) or value is None:
        raise bad
    if kind == "STRING":
        return value if isinstance(value, str) else str(value)
    if kind == "BOOLEAN":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise bad
    if isinstance(value, bool):
        raise bad
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if kind == "FLOAT":
        return number
    if not number.is_integer():
        raise bad
    return int(value) if isinstance(value, int) else int(number)


def _validate_inputs_fn(cls):
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    if inspect.isfunction(fn) and "self" in inspect.signature(fn).parameters:
        fn = getattr(cls(), "VALIDATE_INPUTS")  # declared without @classmethod
    return fn


def _validate_node(nid: str, api: dict, registry: dict) -> list[GraphError]:
    node, errors = api[nid], []
    ct = node["class_type"]
    cls = registry[ct]
    inputs = node["inputs"]
    check = _validate_inputs_fn(cls)
    params = inspect.signature(check).parameters if check else {}
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    received = {}
    for name, spec in input_specs(cls).items():
        def err(kind, msg):
            errors.append(GraphError(kind, msg, nid, ct, name))
        if spec.category == "hidden":
            continue
        if name not in inputs:
            if spec.category == "required":
                err("required_input_missing", "required input is missing")
            continue
        value = inputs[name]
        if isinstance(value, dict) and "__value__" in value:
            value = inputs[name] = value["__value__"]
        elif isinstance(value, (list, tuple)):
            if not is_link(value):
                err("bad_linked_input", f"a link must be [node_id, output_index], got {value!r}")
                continue
            src, slot = inputs[name] = [str(value[0]), value[1]]
            if src not in api:
                err("link_to_missing_node", f"linked to node {src}, which does not exist")
                continue
            src_cls = registry.get(api[src]["class_type"])
            if src_cls is None:
                continue  # reported as an unknown class_type
            outs = tuple(src_cls.RETURN_TYPES)
            if not 0 <= slot < len(outs):
                err("bad_output_slot", f"linked to output {slot} of node {src} ({api[src]['class_type']}), "
                                       f"which has {len(outs)} output(s)")
                continue
            received[name] = outs[slot]
            if "input_types" not in params and not types_match(outs[slot], spec):
                got = "COMBO" if isinstance(outs[slot], (list, tuple)) else outs[slot]
                err("return_type_mismatch", f"type mismatch: node {src} ({api[src]['class_type']}) output "
                                            f"{slot} is {got}, the input takes {spec.type_name}")
            continue
        if not spec.is_widget and spec.type != "*":
            err("invalid_input_type", f"input of type {spec.type_name} needs a link, got the value {value!r}")
            continue
        try:
            value = inputs[name] = _coerce(value, spec) if spec.type != "*" else value
        except ValueError as e:
            err("invalid_input_type", str(e))
            continue
        if name in params or takes_all or spec.type == "*":
            continue  # VALIDATE_INPUTS checks this one itself
        lo, hi, combo = spec.options.get("min"), spec.options.get("max"), spec.combo
        if lo is not None and value < lo:
            err("value_smaller_than_min", f"value {value} is smaller than the minimum {lo}")
        elif hi is not None and value > hi:
            err("value_bigger_than_max", f"value {value} is bigger than the maximum {hi}")
        elif combo is not None and value not in combo:
            shown = combo if len(combo) <= 20 else f"a list of {len(combo)} values"
            err("value_not_in_list", f"value {value!r} is not one of {shown}")
    if check is not None and not errors:
        kwargs = {k: (None if is_link(v) else v) for k, v in inputs.items() if k in params or takes_all}
        if "input_types" in params:
            kwargs["input_types"] = received
        names = ", ".join(k for k in kwargs if k != "input_types") or None
        try:
            verdict = check(**kwargs)
        except Exception as e:
            verdict = f"VALIDATE_INPUTS raised {type(e).__name__}: {e}"
        if verdict is not True:
            msg = "custom validation failed" + (f": {verdict}" if verdict is not False else "")
            errors.append(GraphError("custom_validation_failed", msg, nid, ct, names))
    return errors


def _links_of(node: dict):
    return [(name, str(v[0])) for name, v in node["inputs"].items() if is_link(v)]


def _cycles(api: dict, nodes: set) -> list[GraphError]:
    """One error per node on a cycle (depth-first search from consumers to their sources)."""
    done, stack, via, errors, reported = set(), [], {}, [], set()

    def visit(nid):
        stack.append(nid)
        for name, src in _links_of(api[nid]):
            via[nid] = name
            if src in stack:
                loop = stack[stack.index(src):]
                chain = " <- ".join(loop + [src])
                for n in loop:
                    if n not in reported:
                        reported.add(n)
                        errors.append(GraphError("dependency_cycle", f"is part of a dependency cycle ({chain})",
                                                 n, api[n]["class_type"], via[n]))
            elif src in nodes and src not in done:
                visit(src)
        stack.pop()
        done.add(nid)

    for nid in sorted(nodes, key=_id_key):
        if nid not in done:
            visit(nid)
    return errors


def _needed(api: dict, outputs: list[str]) -> set:
    seen, todo = set(), list(outputs)
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in api:
            continue
        seen.add(nid)
        todo += [src for _, src in _links_of(api[nid])]
    return seen


def _normalize(api: dict) -> tuple[dict, list[GraphError]]:
    """String node ids, an ``inputs`` dict per node; malformed entries become errors."""
    out, errors = {}, []
    if not isinstance(api, dict):
        return {}, [GraphError("invalid_prompt", "the workflow is not a JSON object")]
    for nid, node in api.items():
        nid = str(nid)
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            errors.append(GraphError("invalid_prompt", "node has no class_type", nid, None))
            continue
        inputs = node.get("inputs") or {}
        out[nid] = {**node, "inputs": dict(inputs) if isinstance(inputs, dict) else {}}
    return out, errors


def validate_api(api: dict, registry: dict) -> tuple[dict, list[GraphError], list[str]]:
    """``(normalized graph, errors, output node ids)``; values are converted to their widget types."""
    api, errors = _normalize(api)
    for nid, node in api.items():
        if node["class_type"] not in registry:
            hint = " (a subgraph? unpack it in the editor)" if _UUID.fullmatch(node["class_type"]) else ""
            errors.append(GraphError("unknown_node_type", f"unknown node type {node['class_type']!r}{hint}",
                                     nid, node["class_type"]))
    known = {nid: n for nid, n in api.items() if n["class_type"] in registry}
    outputs = sorted((nid for nid, n in known.items() if getattr(registry[n["class_type"]], "OUTPUT_NODE", False)),
                     key=_id_key)
    if not outputs and not errors:
        errors.append(GraphError("prompt_no_outputs", "the workflow has no output node (OUTPUT_NODE)"))
    needed = _needed(known, outputs) & set(known)
    for nid in sorted(needed, key=_id_key):
        errors += _validate_node(nid, api, registry)
    errors += _cycles(api, needed)
    return api, errors, outputs


def _id_key(nid: str):
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


# ----------------------------------------------------------------------------- execution

class Executor:
    """Runs API graphs; keeps node outputs and node objects between runs (one process, one Executor)."""

    def __init__(self, registry: dict | None = None):
        self.registry = default_registry() if registry is None else registry
        self.cache: dict[str, tuple] = {}   # signature -> (outputs, ui)
        self.objects: dict[tuple, Any] = {}  # (node id, class_type) -> node instance

    def validate(self, api: dict) -> list[GraphError]:
        return validate_api(api, self.registry)[1]

    def run(self, api: dict, extra_pnginfo: dict | None = None) -> RunResult:
        """Validate, then execute what the output nodes need. Raises GraphValidationError,
        NodeExecutionError (node id, type, original message) or progress.Interrupted."""
        api, errors, outputs = validate_api(api, self.registry)
        if errors:
            raise GraphValidationError(errors)
        progress.clear_cancel()
        result, signatures, used = RunResult(prompt=api), {}, {}
        for nid in self._order(api, outputs):
            sig = self._signature(nid, api, signatures)
            hit = self.cache.get(sig)
            if hit is None:  # (_call checks for cancellation before each call)
                hit = self.cache[sig] = self._execute(nid, api, result, extra_pnginfo)
                result.executed.append(nid)
            used[sig] = hit
            result.outputs[nid] = hit[0]
            if hit[1]:
                result.ui[nid] = hit[1]
        self.cache = used  # keep what this graph uses (big models are not kept forever)
        return result

    def _order(self, api: dict, outputs: list[str]) -> list[str]:
        order, seen = [], set()

        def visit(nid):
            if nid not in seen:
                seen.add(nid)
                for _, src in _links_of(api[nid]):
                    visit(src)
                order.append(nid)

        for nid in outputs:
            visit(nid)
        return order

    def _signature(self, nid: str, api: dict, memo: dict) -> str:
        """Hash of class, IS_CHANGED, inputs and upstream signatures (memoized per run)."""
        if nid in memo:
            return memo[nid]
        node = api[nid]
        cls = self.registry[node["class_type"]]
        specs = input_specs(cls)
        parts = [node["class_type"], self._is_changed(cls, node["inputs"])]
        hidden = {s.type for s in specs.values() if s.category == "hidden"}
        if getattr(cls, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden:
            parts.append(nid)
        for name in sorted(node["inputs"]):
            v = node["inputs"][name]
            parts.append([name, ["LINK", self._signature(v[0], api, memo), v[1]] if is_link(v) else v])
        text = json.dumps(parts, sort_keys=True, default=repr)
        memo[nid] = hashlib.sha256(text.encode()).hexdigest()
        return memo[nid]

    def _is_changed(self, cls, inputs: dict) -> Any:
        fn = getattr(cls, "IS_CHANGED", None)
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
            return _call(cls, getattr(self.objects[key], cls.FUNCTION), args)
        except progress.Interrupted:
            raise
        except Exception as e:
            if type(e).__name__ == "InterruptProcessingException":  # ComfyUI's cancel
                raise
            raise NodeExecutionError(nid, ct, e, result) from e


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
        changes = apply_overrides(api, overrides)
    except KeyError as e:
        raise GraphValidationError([GraphError("bad_override", str(e.args[0]))]) from None
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
