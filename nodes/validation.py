"""Validation of API-format graphs against node classes, before anything runs.

Reports every problem, each with node id, class_type and input name (ComfyUI's node_errors kinds where
one exists): unknown class_type, missing required input, an input the class does not declare (with the
close match), malformed link, link to a missing node or a missing output slot, mismatched link types ("*"
matches anything; COMBO outputs feed COMBO inputs), a value of the wrong type, out of min/max or not in a
COMBO (the choices listed, the closest suggested), VALIDATE_INPUTS failures, cycles and a graph without an
output node. As in ComfyUI only nodes an output needs are checked (a dangling node is neither run nor
checked); every node's class_type is. A graph without problems then gets its resource budget checked
(nodes/budget.py). Every walk over the graph is iterative, so a graph of any depth is fine.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

from .errors import GraphError, GraphValidationError, listing, suggest
from .workflow import InputSpec, input_specs

__all__ = ["GraphError", "GraphValidationError", "validate_api", "is_link", "links_of", "types_match", "class_hook",
           "topological_order"]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


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


def class_hook(cls, name: str):
    """``cls.VALIDATE_INPUTS`` / ``cls.IS_CHANGED`` callable with keyword inputs only, or None."""
    fn = getattr(cls, name, None)
    if inspect.isfunction(fn) and next(iter(inspect.signature(fn).parameters), None) in ("self", "s", "cls"):
        fn = getattr(cls(), name)  # declared without @classmethod
    return fn


def _validate_node(nid: str, api: dict, registry: dict) -> list[GraphError]:
    node, errors = api[nid], []
    ct = node["class_type"]
    cls = registry[ct]
    inputs = node["inputs"]
    check = class_hook(cls, "VALIDATE_INPUTS")
    params = inspect.signature(check).parameters if check else {}
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    received = {}
    specs = input_specs(cls)
    declared = [n for n, sp in specs.items() if sp.category != "hidden"]
    for name in inputs:
        if name not in specs:  # ComfyUI ignores these; here a typo must not pass silently
            errors.append(GraphError("unknown_input", f"{ct} has no input {name!r}{suggest(name, declared)} "
                                                      f"(its inputs: {', '.join(declared) or 'none'})", nid, ct, name))
    for name, spec in specs.items():
        def err(kind, msg, name=name):
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
            err("value_not_in_list", f"value {value!r} is not one of the choices{suggest(value, combo)} "
                                     f"(choices: {listing(combo)})")
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


def links_of(node: dict):
    return [(name, str(v[0])) for name, v in node["inputs"].items() if is_link(v)]


def _cycles(api: dict, nodes: set) -> list[GraphError]:
    """One error per node on a cycle (strongly connected components, found without recursion)."""
    errors = []
    for comp in _components(api, nodes):
        members = set(comp)
        if len(comp) == 1 and comp[0] not in {src for _, src in links_of(api[comp[0]])}:
            continue  # a single node without a self link is no cycle
        chain = " <- ".join(_cycle_path(api, min(comp, key=_id_key), members))
        for n in sorted(comp, key=_id_key):
            via = next((name for name, src in links_of(api[n]) if src in members), None)
            errors.append(GraphError("dependency_cycle", f"is part of a dependency cycle ({chain})",
                                     n, api[n]["class_type"], via))
    return errors


def _components(api: dict, nodes: set) -> list[list[str]]:
    """Tarjan's strongly connected components over consumer -> source links, with an explicit stack."""
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], 0
    for root in sorted(nodes, key=_id_key):
        if root in index:
            continue
        work = [(root, iter([s for _, s in links_of(api[root]) if s in nodes]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            nid, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter([s for _, s in links_of(api[child]) if s in nodes])))
                elif child in on_stack:
                    low[nid] = min(low[nid], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[nid])
            if low[nid] == index[nid]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == nid:
                        break
                comps.append(comp)
    return comps


def _cycle_path(api: dict, start: str, members: set) -> list[str]:
    """One cycle through ``start`` inside a component (breadth-first), as node ids ending with ``start``."""
    parent, todo = {start: None}, [start]
    while todo:
        nid = todo.pop(0)
        for _, src in links_of(api[nid]):
            if src == start:
                path = [nid]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return list(reversed(path)) + [start] if path[-1] == start else [start] + list(reversed(path))
            if src in members and src not in parent:
                parent[src] = nid
                todo.append(src)
    return [start, start]


def topological_order(api: dict, roots: list[str]) -> list[str]:
    """Every node ``roots`` need, sources before consumers, each root after its own sources (depth-first
    post-order from the roots in order, kept on an explicit stack: a long chain cannot overflow)."""
    order, seen = [], set()
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        work = [(root, iter(links_of(api[root])))]
        while work:
            nid, children = work[-1]
            for _, src in children:
                if src not in seen and src in api:
                    seen.add(src)
                    work.append((src, iter(links_of(api[src]))))
                    break
            else:
                work.pop()
                order.append(nid)
    return order


def _needed(api: dict, outputs: list[str]) -> set:
    seen, todo = set(), list(outputs)
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in api:
            continue
        seen.add(nid)
        todo += [src for _, src in links_of(api[nid])]
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
        inputs = node.get("inputs", {})
        if inputs is None:
            inputs = {}
        if not isinstance(inputs, dict):
            errors.append(GraphError("invalid_prompt", f"'inputs' must be an object of input names, got "
                                                       f"{type(inputs).__name__}", nid, node["class_type"]))
            continue
        out[nid] = {**node, "inputs": dict(inputs)}
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
    if not errors:  # what the graph will cost, before any work (the pack's budget; other nodes cost nothing)
        from .budget import check_graph
        errors += check_graph(api, topological_order(api, outputs), registry)
    return api, errors, outputs


def _id_key(nid: str):
    return (0, int(nid), "") if nid.isascii() and nid.isdigit() else (1, 0, nid)
