"""Workflow files: node schemas, UI-format parsing, UI -> API conversion, PNG metadata, overrides.

Two formats exist (see ComfyUI's conventions):
- API: ``{"<id>": {"class_type": str, "inputs": {name: value | ["<from id>", out_index]}}}``.
- UI: what the editor saves, ``{"nodes": [...], "links": [...], "version": 0.4 | 1}``. Widget values
  are positional, so converting needs each node class's ``INPUT_TYPES`` (the registry).

No Stable Diffusion knowledge lives here; node classes come from a registry ``{id: class}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
FRONTEND_ONLY = ("Reroute", "PrimitiveNode", "Note", "MarkdownNote")
MUTED, BYPASSED = 2, 4
SEED_NAMES = ("seed", "noise_seed")  # the editor adds control_after_generate to these by default


# ----------------------------------------------------------------------------- node schemas

@dataclass(frozen=True)
class InputSpec:
    """One entry of a class's INPUT_TYPES: ``type`` is a type name, or the option list of a COMBO."""
    name: str
    type: Any
    options: dict
    category: str  # "required" | "optional" | "hidden"

    @property
    def combo(self) -> list | None:
        if isinstance(self.type, (list, tuple)):
            return list(self.type)
        if self.type == "COMBO":
            return list(self.options.get("options", []))
        return None

    @property
    def type_name(self) -> str:
        return "COMBO" if self.combo is not None else str(self.type)

    @property
    def is_widget(self) -> bool:
        if self.category == "hidden" or self.options.get("forceInput"):
            return False
        return self.combo is not None or self.type in WIDGET_TYPES

    @property
    def has_control(self) -> bool:
        """The editor saves an extra "fixed/increment/decrement/randomize" value after this widget."""
        flag = self.options.get("control_after_generate")
        if flag is None and self.type == "INT":
            return self.name in SEED_NAMES
        return bool(flag)


def input_specs(cls) -> dict[str, InputSpec]:
    """``{name: InputSpec}`` of a node class in INPUT_TYPES order (required, optional, hidden)."""
    specs = {}
    for category in ("required", "optional", "hidden"):
        for name, entry in (cls.INPUT_TYPES().get(category) or {}).items():
            if not isinstance(entry, (tuple, list)):  # hidden inputs: "PROMPT", not ("PROMPT",)
                entry = (entry,)
            typ = entry[0] if len(entry) else "*"
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            specs[name] = InputSpec(name, typ, opts, category)
    return specs


def widget_slots(cls, n_values: int | None = None) -> list[str | None]:
    """Names of the positional ``widgets_values`` slots (None = an editor-only control value).

    When ``n_values`` matches the layout without control values (hand-written files), that one is used.
    """
    widgets = [s for s in input_specs(cls).values() if s.is_widget]
    full = [x for s in widgets for x in ((s.name, None) if s.has_control else (s.name,))]
    if n_values is not None and n_values < len(full) and n_values == len(widgets):
        return [s.name for s in widgets]
    return full


def default_registry() -> dict:
    """The pack's NODE_CLASS_MAPPINGS, imported lazily (the node modules import torch)."""
    from .. import NODE_CLASS_MAPPINGS
    return NODE_CLASS_MAPPINGS


# ----------------------------------------------------------------------------- loading

@dataclass
class Workflow:
    """A loaded workflow: the API graph, the UI graph, or both (a PNG written by SaveImage)."""
    api: dict | None = None
    ui: dict | None = None
    source: str = "<dict>"
    extra: dict = field(default_factory=dict)  # other PNG text chunks


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def as_workflow(data: Any, source: str = "<dict>") -> Workflow:
    """Wrap a parsed JSON document (API graph, UI graph, or a ``POST /prompt`` body)."""
    if isinstance(data, Workflow):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a workflow must be a JSON object, got {type(data).__name__}")
    if is_ui_format(data):
        return Workflow(ui=data, source=source)
    if isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:  # a POST /prompt body
        ui = (data.get("extra_data") or {}).get("extra_pnginfo", {}).get("workflow")
        return Workflow(api=data["prompt"], ui=ui, source=source)
    return Workflow(api=data, source=source)


def read_png_text(path) -> dict[str, str]:
    """tEXt / iTXt chunks of a PNG as ``{key: text}``."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return {k: v for k, v in getattr(im, "text", im.info).items() if isinstance(v, str)}


def load_workflow(path) -> Workflow:
    """Load a workflow from a JSON file (either format) or a PNG carrying ``prompt`` / ``workflow``."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89PNG\r\n\x1a\n":
        text = read_png_text(path)
        if "prompt" not in text and "workflow" not in text:
            raise ValueError(f"{path}: PNG has no 'prompt' or 'workflow' text chunk")
        try:
            api = json.loads(text["prompt"]) if "prompt" in text else None
            ui = json.loads(text["workflow"]) if "workflow" in text else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: a PNG text chunk is not valid JSON ({e})") from None
        extra = {k: v for k, v in text.items() if k not in ("prompt", "workflow")}
        return Workflow(api=api, ui=ui, source=str(path), extra=extra)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return as_workflow(data, str(path))


# ----------------------------------------------------------------------------- UI -> API

def _links(ui: dict) -> dict:
    """``{link_id: (origin_id, origin_slot, target_id, target_slot, type)}`` for both schemas."""
    out = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            link = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        out[link[0]] = tuple(link[1:6])
    return out


def _resolve(link_id, nodes: dict, links: dict, seen=()) -> Any:
    """Follow a UI link through Reroute / bypass / PrimitiveNode to its API source.

    Returns ``["<id>", slot]`` (a link), ``("value", v)`` (a primitive's value) or None (no source).
    """
    if link_id is None or link_id not in links or link_id in seen:
        return None
    seen = (*seen, link_id)
    origin, slot = links[link_id][0], links[link_id][1]
    node = nodes.get(origin)
    if node is None:  # dangling: left for validation to report
        return [str(origin), slot]
    kind, mode = node.get("type"), node.get("mode", 0)
    if kind == "Reroute":
        return _resolve(next((i.get("link") for i in node.get("inputs") or []), None), nodes, links, seen)
    if kind == "PrimitiveNode":
        values = node.get("widgets_values") or []
        return ("value", values[0]) if values else None
    if kind in FRONTEND_ONLY or mode == MUTED:
        return None
    if mode == BYPASSED:  # pass through an input of the output's type, same slot index first
        outs = node.get("outputs") or []
        want = outs[slot].get("type") if slot < len(outs) else None
        ins = node.get("inputs") or []
        for inp in ins[slot:slot + 1] + ins:
            if inp.get("link") is not None and inp.get("type") == want:
                return _resolve(inp["link"], nodes, links, seen)
        return None
    return [str(origin), slot]


def convert_ui_to_api(ui: dict, registry: dict | None = None) -> dict:
    """Convert an editor (UI-format) workflow to the API format, as the editor's "queue" does.

    Muted / bypassed / frontend-only nodes are dropped; links are followed through them. Node classes
    missing from the registry keep their links only (validation then reports the unknown class_type).
    """
    registry = default_registry() if registry is None else registry
    nodes = {n["id"]: n for n in ui.get("nodes", [])}
    links = _links(ui)
    api = {}
    for nid, node in nodes.items():
        kind = node.get("type")
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        cls = registry.get(kind)
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        if cls is not None and isinstance(values, dict):  # some editors save widgets by name
            specs = input_specs(cls)
            inputs.update({k: v for k, v in values.items() if k in specs and specs[k].is_widget})
        elif cls is not None and values:
            for name, value in zip(widget_slots(cls, len(values)), values):
                if name is not None:
                    inputs[name] = value
        for inp in node.get("inputs") or []:
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            src = _resolve(inp.get("link"), nodes, links)
            if isinstance(src, tuple):
                inputs[name] = src[1]
            elif src is not None:
                inputs[name] = src  # (no source, e.g. muted: a widget keeps its own value)
        entry = {"class_type": kind, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(nid)] = entry
    return api


def to_api(workflow, registry: dict | None = None) -> tuple[dict, dict | None]:
    """``(api_graph, extra_pnginfo)`` of a Workflow; the API graph is preferred when both exist."""
    wf = as_workflow(workflow)
    api = wf.api if wf.api is not None else convert_ui_to_api(wf.ui, registry)
    api = json.loads(json.dumps(api))  # a private copy: validation normalizes values in place
    return api, ({"workflow": wf.ui} if wf.ui is not None else None)


# ----------------------------------------------------------------------------- overrides

def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def find_node(api: dict, ref: str) -> str:
    """Node id for ``ref``: an id, else a unique title (``_meta.title``), else a unique class_type."""
    if ref in api:
        return ref
    for key in ("title", "class_type"):
        hits = [nid for nid, n in api.items()
                if (n.get("_meta", {}).get("title") if key == "title" else n.get("class_type")) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise KeyError(f"node {ref!r} is ambiguous: it matches nodes {', '.join(hits)}")
    raise KeyError(f"no node {ref!r} (give a node id, a title or a class_type)")


def apply_overrides(api: dict, overrides: dict | None) -> list[tuple[str, str, Any]]:
    """Set inputs: ``{"NODE.INPUT": value}`` or ``{"NODE": {"INPUT": value}}`` (NODE: see find_node).

    Returns the ``(node id, input, value)`` changes made; KeyError for an unknown node.
    """
    done = []
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and "." not in str(key):
            pairs = [(str(key), k, v) for k, v in value.items()]
        else:
            ref, sep, name = str(key).rpartition(".")
            if not sep or not ref or not name:
                raise KeyError(f"override {key!r} must look like NODE.INPUT")
            pairs = [(ref, name, value)]
        for ref, name, v in pairs:
            nid = find_node(api, ref)
            api[nid].setdefault("inputs", {})[name] = v
            done.append((nid, name, v))
    return done


def apply_overrides_ui(ui: dict, changes: list, registry: dict) -> dict:
    """A copy of an editor workflow with the same changes in its widget values (for EXTRA_PNGINFO)."""
    ui = json.loads(json.dumps(ui))
    nodes = {str(n["id"]): n for n in ui.get("nodes", [])}
    for nid, name, value in changes:
        node, cls = nodes.get(nid), registry.get((nodes.get(nid) or {}).get("type"))
        values = (node or {}).get("widgets_values")
        if cls is None or values is None:
            continue
        if isinstance(values, dict):
            values[name] = value
            continue
        slots = widget_slots(cls, len(values))
        if name in slots and slots.index(name) < len(values):
            values[slots.index(name)] = value
    return ui
