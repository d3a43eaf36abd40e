"""Dummy V1 node classes and graph builders for the graph machinery tests (no torch, no SD)."""
from __future__ import annotations

from collections import Counter

from glass_diffusion.nodes import progress

CALLS: Counter = Counter()  # class name -> number of calls of its function
SUNK: list = []             # what Sink received: (value, unique_id, prompt, extra_pnginfo)


class Const:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": -100, "max": 100})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, value):
        CALLS["Const"] += 1
        return (value,)


class Add:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 0})},
                "optional": {"c": ("INT", {"forceInput": True})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "add"

    def add(self, a, b, c=0):
        CALLS["Add"] += 1
        return (a + b + c,)


class Seeded:
    """seed (with control_after_generate), a COMBO, a FLOAT and a STRING widget."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**32,
                                              "control_after_generate": True}),
                             "mode": (["add", "mul"],),
                             "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0}),
                             "note": ("STRING", {"default": ""})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, seed, mode, scale, note):
        CALLS["Seeded"] += 1
        return (int(seed * scale) if mode == "mul" else int(seed + scale),)


class Text:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"

    def run(self, text):
        CALLS["Text"] += 1
        return (text,)


class Negate:
    """One INT in, one INT out: the node that tests bypass with."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, x):
        CALLS["Negate"] += 1
        return (-x,)


class Sink:
    """OUTPUT_NODE taking anything; records its inputs and returns them as ui."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)},
                "optional": {"path": ("STRING", {"default": ""})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}}
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    def save(self, value, path="", prompt=None, extra_pnginfo=None, unique_id=None):
        CALLS["Sink"] += 1
        SUNK.append((value, unique_id, prompt, extra_pnginfo))
        if path:
            with open(path, "w") as f:
                f.write(str(value))
        return {"ui": {"values": [value]}}


class Changing:
    """IS_CHANGED returns ``Changing.token``."""
    token = 0

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 0})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def IS_CHANGED(cls, x):
        return cls.token

    def run(self, x):
        CALLS["Changing"] += 1
        return (x + 1000,)


class Impure(Const):
    NOT_IDEMPOTENT = True

    def run(self, value):
        CALLS["Impure"] += 1
        return (value,)


class Fails:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, x):
        raise ValueError(f"boom {x}")


class Cancel:
    """Requests cancellation while running, like the CLI's Ctrl-C handler."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, x):
        CALLS["Cancel"] += 1
        progress.request_cancel()
        return (x,)


class Even:
    """VALIDATE_INPUTS: x must be even (and it replaces the min/max check of x)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 0, "min": 0, "max": 10})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def VALIDATE_INPUTS(cls, x):
        return True if x % 2 == 0 else f"x must be even, got {x}"

    def run(self, x):
        return (x,)


class MakeImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self):
        return ("image",)


class Repeat:
    """OUTPUT_IS_LIST: emits [x, x+1, ..., x+n-1]; downstream nodes run once per item."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True}), "n": ("INT", {"default": 3, "min": 0})}}
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "run"

    def run(self, x, n):
        return ([x + i for i in range(n)],)


class Total:
    """INPUT_IS_LIST: sums a list."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xs": ("INT", {"forceInput": True})}}
    RETURN_TYPES = ("INT",)
    INPUT_IS_LIST = True
    FUNCTION = "run"

    def run(self, xs):
        return (sum(xs),)


REGISTRY = {c.__name__: c for c in (Const, Add, Seeded, Text, Negate, Sink, Changing, Impure, Fails,
                                    Cancel, Even, MakeImage, Repeat, Total)}


def reset():
    CALLS.clear()
    SUNK.clear()
    Changing.token = 0
    progress.clear_cancel()


def api(**nodes):
    """``api(n1=("Const", {"value": 2}), ...)`` -> API graph with ids "1", ... (the n prefix dropped)."""
    return {k.lstrip("n"): {"class_type": c, "inputs": dict(i)} for k, (c, i) in nodes.items()}


class UIBuilder:
    """Builds UI-format workflows (schema 0.4 list links, or schema 1 object links)."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, nid, type_, widgets=None, inputs=(), outputs=(), mode=0, title=None):
        """inputs/outputs: [(name, TYPE)] or [(name, TYPE, widget_name)] for a converted widget."""
        n = {"id": nid, "type": type_, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": len(self.nodes),
             "mode": mode, "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets or []),
             "inputs": [{"name": i[0], "type": i[1], "link": None, **({"widget": {"name": i[2]}} if len(i) > 2 else {})}
                        for i in inputs],
             "outputs": [{"name": o[0], "type": o[1], "links": [], "slot_index": s} for s, o in enumerate(outputs)]}
        if title:
            n["title"] = title
        self.nodes.append(n)
        return self

    def link(self, src, src_slot, dst, dst_slot):
        by_id = {n["id"]: n for n in self.nodes}
        lid = len(self.links) + 1
        typ = by_id[src]["outputs"][src_slot]["type"]
        self.links.append([lid, src, src_slot, dst, dst_slot, typ])
        by_id[src]["outputs"][src_slot]["links"].append(lid)
        by_id[dst]["inputs"][dst_slot]["link"] = lid
        return self

    def build(self, schema=0.4):
        g = {"last_node_id": max((n["id"] for n in self.nodes), default=0), "last_link_id": len(self.links),
             "nodes": self.nodes, "links": self.links, "groups": [], "config": {}, "extra": {}, "version": schema}
        if schema == 1:
            keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
            g["links"] = [dict(zip(keys, link)) for link in self.links]
            g["state"] = {"lastNodeId": g.pop("last_node_id"), "lastLinkId": g.pop("last_link_id"),
                          "lastGroupId": 0, "lastRerouteId": 0}
        return g
