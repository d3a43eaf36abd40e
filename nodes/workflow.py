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
from typing import Any

from . import shipped
from .errors import GraphError, GraphValidationError, suggest

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
FRONTEND_ONLY = ("Reroute", "PrimitiveNode", "Note", "MarkdownNote")
MUTED, BYPASSED = 2, 4
SEED_NAMES = ("seed", "noise_seed")  # the editor adds control_after_generate to these by default
MAX_JSON_DEPTH = 64  # nesting of arrays / objects in a workflow; the editor's own files stay under 12
MAX_WORKFLOW_BYTES = 64 * 2 ** 20  # a workflow file (JSON) larger than this is refused before it is read


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


def check_depth(data: Any, source: str, limit: int = MAX_JSON_DEPTH) -> None:
    """ValueError naming ``source`` when arrays / objects nest deeper than ``limit`` (checked without recursion)."""
    todo = [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        if depth > limit:
            raise ValueError(f"{source}: nested deeper than {limit} levels of arrays / objects; not a workflow")
        todo.extend((child, depth + 1) for child in children)


def parse_json(text: str, source: str) -> Any:
    """json.loads with the nesting limit; ValueError naming the source for bad or too deeply nested JSON."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{source}: nested deeper than {MAX_JSON_DEPTH} levels of arrays / objects; "
                         "not a workflow") from None
    check_depth(data, source)
    return data


def as_workflow(data: Any, source: str = "<dict>") -> Workflow:
    """Wrap a parsed JSON document (API graph, UI graph, or a ``POST /prompt`` body)."""
    if isinstance(data, Workflow):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a workflow must be a JSON object, got {type(data).__name__}")
    check_depth(data, source)
    if is_ui_format(data):
        return Workflow(ui=data, source=source)
    if isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:  # a POST /prompt body
        extra = data.get("extra_data")
        pnginfo = extra.get("extra_pnginfo") if isinstance(extra, dict) else None
        ui = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
        return Workflow(api=data["prompt"], ui=ui if is_ui_format(ui) else None, source=source)
    return Workflow(api=data, source=source)


def read_png_text(path) -> dict[str, str]:
    """tEXt / iTXt / zTXt chunks of a PNG as ``{key: text}``; ValueError naming the file when it is broken."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            return {k: v for k, v in getattr(im, "text", im.info).items() if isinstance(v, str)}
    except (UnidentifiedImageError, SyntaxError, OSError, ValueError, EOFError) as e:
        # Pillow: SyntaxError for a broken chunk, ValueError for a text chunk over its size limit
        raise ValueError(f"{path}: not a readable PNG ({type(e).__name__}: {e})") from None


def load_workflow(path) -> Workflow:
    """Load a workflow from a JSON file (either format) or a PNG carrying ``prompt`` / ``workflow``; a path that
    does not exist may name a shipped workflow ("text_to_image", "workflows/text_to_image.json": nodes/shipped.py)."""
    path = shipped.resolve_workflow(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such workflow file")
    if path.stat().st_size > MAX_WORKFLOW_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, over the {MAX_WORKFLOW_BYTES} a workflow may have")
    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89PNG\r\n\x1a\n":
        text = read_png_text(path)
        if "prompt" not in text and "workflow" not in text:
            raise ValueError(f"{path}: PNG has no 'prompt' or 'workflow' text chunk")
        api = parse_json(text["prompt"], f"{path} (text chunk 'prompt')") if "prompt" in text else None
        ui = parse_json(text["workflow"], f"{path} (text chunk 'workflow')") if "workflow" in text else None
        if api is not None and not isinstance(api, dict):
            raise ValueError(f"{path}: text chunk 'prompt' holds a {type(api).__name__}, not a workflow object")
        if ui is not None and not is_ui_format(ui):
            if api is None:
                raise ValueError(f"{path}: text chunk 'workflow' is not an editor workflow (no 'nodes' list)")
            ui = None  # the API graph runs; an unusable editor copy is not carried along
        extra = {k: v for k, v in text.items() if k not in ("prompt", "workflow")}
        return Workflow(api=api, ui=ui, source=str(path), extra=extra)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "a workflow is a UTF-8 JSON file or a PNG") from None
    return as_workflow(parse_json(text, str(path)), str(path))


# ----------------------------------------------------------------------------- UI -> API

def _is_id(value) -> bool:
    """A node or link id as the editor writes it: an integer or a string (never a bool, float or container)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _is_slot(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_ui(ui: dict) -> tuple[dict, dict]:
    """``(nodes by id, links by id)`` of an editor workflow, every structure checked first: a malformed node,
    socket or link is a GraphError naming it (``GraphValidationError`` with all of them), never a crash."""
    errors, nodes, links = [], {}, {}

    def bad(message, node_id=None, class_type=None, field=None):
        errors.append(GraphError("invalid_workflow", message, None if node_id is None else str(node_id),
                                 class_type, field))

    for i, node in enumerate(ui.get("nodes") or []):
        if not isinstance(node, dict):
            bad(f"entry {i} of 'nodes' is not a node object (got {type(node).__name__} {str(node)[:40]})",
                field=f"nodes[{i}]")
            continue
        nid, kind = node.get("id"), node.get("type")
        if not _is_id(nid):
            bad(f"entry {i} of 'nodes' has no valid 'id' (got {nid!r})", field=f"nodes[{i}].id")
            continue
        if not isinstance(kind, str):
            bad(f"node has no valid 'type' (got {kind!r})", nid, None, "type")
            continue
        if nid in nodes or str(nid) in {str(k) for k in nodes}:
            bad("two nodes have this id", nid, kind, "id")
            continue
        mode = node.get("mode", 0)
        if mode is not None and (not isinstance(mode, int) or isinstance(mode, bool)):
            bad(f"'mode' must be an integer, got {mode!r}", nid, kind, "mode")
            continue
        values = node.get("widgets_values")
        if values is not None and not isinstance(values, (list, dict)):
            bad(f"'widgets_values' must be a list or an object, got {type(values).__name__}", nid, kind,
                "widgets_values")
            continue
        if node.get("title") is not None and not isinstance(node.get("title"), str):
            bad(f"'title' must be a string, got {type(node['title']).__name__}", nid, kind, "title")
            continue
        ok = True
        for key, need in (("inputs", ("name",)), ("outputs", ())):
            sockets = node.get(key)
            if sockets is None:
                continue
            if not isinstance(sockets, list):
                bad(f"'{key}' must be a list, got {type(sockets).__name__}", nid, kind, key)
                ok = False
                continue
            for j, sock in enumerate(sockets):
                where = f"{key}[{j}]"
                if not isinstance(sock, dict):
                    bad(f"{where} is not a socket object (got {type(sock).__name__})", nid, kind, where)
                    ok = False
                elif any(not isinstance(sock.get(k), str) for k in need):
                    bad(f"{where} has no valid 'name' (got {sock.get('name')!r})", nid, kind, where)
                    ok = False
                elif sock.get("link") is not None and not _is_id(sock.get("link")):
                    bad(f"{where}.link must be a link id, got {sock.get('link')!r}", nid, kind, where)
                    ok = False
                elif sock.get("widget") is not None and not (isinstance(sock["widget"], dict) and
                                                             isinstance(sock["widget"].get("name", ""), str)):
                    bad(f"{where}.widget must be an object with a 'name', got {sock['widget']!r}", nid, kind, where)
                    ok = False
                elif sock.get("type") is not None and not isinstance(sock["type"], (str, list)):
                    bad(f"{where}.type must be a type name, got {sock['type']!r}", nid, kind, where)
                    ok = False
        if ok:
            nodes[nid] = node

    raw_links = ui.get("links")
    if raw_links is not None and not isinstance(raw_links, list):
        bad(f"'links' must be a list, got {type(raw_links).__name__}", field="links")
        raw_links = []
    for i, link in enumerate(raw_links or []):
        if isinstance(link, dict):
            link = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        if not isinstance(link, list) or len(link) < 5:
            bad(f"link entry {i} must be [id, from_node, from_slot, to_node, to_slot, type] or a link object, "
                f"got {link!r}"[:300], field=f"links[{i}]")
            continue
        lid, origin, slot, target, tslot = link[:5]
        if not (_is_id(lid) and _is_id(origin) and _is_slot(slot) and _is_id(target) and _is_slot(tslot)):
            bad(f"link {lid!r}: ids must be integers or strings and slots integers >= 0, got {link[:5]!r}"[:300],
                field=f"links[{i}]")
            continue
        if lid in links:
            bad(f"link {lid!r} appears twice", field=f"links[{i}]")
            continue
        links[lid] = (origin, slot, target, tslot, link[5] if len(link) > 5 else None)
    if errors:
        raise GraphValidationError(errors)
    return nodes, links


def _links(ui: dict) -> dict:
    """``{link_id: (origin_id, origin_slot, target_id, target_slot, type)}`` for both schemas."""
    return _check_ui(ui)[1]


def _resolve(link_id, nodes: dict, links: dict) -> Any:
    """Follow a UI link through Reroute / bypass / PrimitiveNode to its API source (a loop, never recursion;
    a link seen twice ends the walk).

    Returns ``["<id>", slot]`` (a link), ``("value", v)`` (a primitive's value) or None (no source).
    """
    seen = set()
    while link_id is not None and link_id in links and link_id not in seen:
        seen.add(link_id)
        origin, slot = links[link_id][0], links[link_id][1]
        node = nodes.get(origin)
        if node is None:  # dangling: left for validation to report
            return [str(origin), slot]
        kind, mode = node.get("type"), node.get("mode", 0)
        ins = node.get("inputs") or []
        if kind == "Reroute":
            link_id = next((i.get("link") for i in ins), None)
            continue
        if kind == "PrimitiveNode":
            values = node.get("widgets_values") or []
            if isinstance(values, dict):
                values = list(values.values())
            return ("value", values[0]) if values else None
        if kind in FRONTEND_ONLY or mode == MUTED:
            return None
        if mode == BYPASSED:  # pass through an input of the output's type, same slot index first
            outs = node.get("outputs") or []
            want = outs[slot].get("type") if slot < len(outs) else None
            link_id = next((inp["link"] for inp in ins[slot:slot + 1] + ins
                            if inp.get("link") is not None and inp.get("type") == want), None)
            continue
        return [str(origin), slot]
    return None


def convert_ui_to_api(ui: dict, registry: dict | None = None) -> dict:
    """Convert an editor (UI-format) workflow to the API format, as the editor's "queue" does.

    Muted / bypassed / frontend-only nodes are dropped; links are followed through them. Node classes
    missing from the registry keep their links only (validation then reports the unknown class_type).
    A malformed file raises ``GraphValidationError`` naming each bad node, socket or link.
    """
    registry = default_registry() if registry is None else registry
    if not is_ui_format(ui):
        raise GraphValidationError([GraphError("invalid_workflow", "an editor workflow needs a 'nodes' list")])
    nodes, links = _check_ui(ui)
    api, errors = {}, []
    for nid, node in nodes.items():
        kind = node.get("type")
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        cls = registry.get(kind)
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        try:
            if cls is not None and isinstance(values, dict):  # some editors save widgets by name
                specs = input_specs(cls)
                inputs.update({k: v for k, v in values.items() if k in specs and specs[k].is_widget})
            elif cls is not None and values:
                for name, value in zip(widget_slots(cls, len(values)), values):
                    if name is not None:
                        inputs[name] = value
        except Exception as e:  # a node class whose INPUT_TYPES cannot be read
            errors.append(GraphError("invalid_workflow", f"cannot read the inputs of {kind}: "
                                                         f"{type(e).__name__}: {e}", str(nid), kind))
            continue
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
    if errors:
        raise GraphValidationError(errors)
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


class OverrideError(KeyError):
    """An override (``--set NODE.INPUT=VALUE``) that names no node or no input; fields as in GraphError."""

    def __init__(self, message: str, node_id: str | None = None, class_type: str | None = None,
                 input_name: str | None = None):
        super().__init__(message)
        self.message, self.node_id, self.class_type, self.input_name = message, node_id, class_type, input_name

    def __str__(self) -> str:
        return self.message

    def graph_error(self) -> GraphError:
        return GraphError("bad_override", self.message, self.node_id, self.class_type, self.input_name)


def find_node(api: dict, ref: str) -> str:
    """Node id for ``ref``: an id, else a unique title (``_meta.title``), else a unique class_type."""
    if ref in api:
        return ref
    names = {}
    for key in ("title", "class_type"):
        hits = [nid for nid, n in api.items() if isinstance(n, dict) and
                ((n.get("_meta") or {}).get("title") if key == "title" else n.get("class_type")) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise OverrideError(f"node {ref!r} is ambiguous: it matches nodes {', '.join(hits)}; give the id")
    for nid, n in api.items():
        if isinstance(n, dict):
            title = (n.get("_meta") or {}).get("title") if isinstance(n.get("_meta"), dict) else None
            names[nid] = f"{nid} ({title or n.get('class_type')})"
    choices = list(api) + [(n.get("_meta") or {}).get("title") for n in api.values()
                           if isinstance(n, dict) and isinstance(n.get("_meta"), dict)]
    raise OverrideError(f"no node {ref!r}{suggest(ref, [c for c in choices if isinstance(c, str)])} "
                        f"(give a node id, a title or a class_type; the nodes: {', '.join(names.values())})")


def apply_overrides(api: dict, overrides: dict | None, registry: dict | None = None) -> list[tuple[str, str, Any]]:
    """Set inputs: ``{"NODE.INPUT": value}`` or ``{"NODE": {"INPUT": value}}`` (NODE: see find_node).

    Returns the ``(node id, input, value)`` changes made. ``OverrideError`` (a KeyError) for an unknown node,
    and, given the registry, for an input the node's class does not have (with the close match and the
    inputs it has).
    """
    done = []
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and "." not in str(key):
            pairs = [(str(key), k, v) for k, v in value.items()]
        else:
            ref, sep, name = str(key).rpartition(".")
            if not sep or not ref or not name:
                raise OverrideError(f"override {key!r} must look like NODE.INPUT")
            pairs = [(ref, name, value)]
        for ref, name, v in pairs:
            nid = find_node(api, ref)
            node = api[nid]
            cls = registry.get(node.get("class_type")) if registry is not None and isinstance(node, dict) else None
            if cls is not None:
                declared = [n for n, sp in input_specs(cls).items() if sp.category != "hidden"]
                if name not in declared:
                    raise OverrideError(f"{node['class_type']} has no input {name!r}{suggest(name, declared)} "
                                        f"(its inputs: {', '.join(declared) or 'none'})",
                                        nid, node["class_type"], name)
            if not isinstance(node, dict) or not isinstance(node.setdefault("inputs", {}), dict):
                raise OverrideError(f"node {nid} is malformed (no inputs object)", nid)
            node["inputs"][name] = v
            done.append((nid, name, v))
    return done


def apply_overrides_ui(ui: dict, changes: list, registry: dict) -> dict:
    """A copy of an editor workflow with the same changes in its widget values (for EXTRA_PNGINFO)."""
    ui = json.loads(json.dumps(ui))
    nodes = {str(n["id"]): n for n in ui.get("nodes") or [] if isinstance(n, dict) and _is_id(n.get("id"))}
    for nid, name, value in changes:
        node = nodes.get(nid)
        cls = registry.get(node.get("type")) if node is not None and isinstance(node.get("type"), str) else None
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
