"""The shipped example workflows, described once in Python and written in both formats:

- workflows/<name>.json: editor (UI) format, version 0.4, which ComfyUI serves as templates;
- workflows/api/<name>.json: the API format twin (what ``glass-diffusion run`` and POST /prompt take).

The API twin is written straight from the description (not by converting the UI file), so the tests'
check "convert(UI) == API twin" exercises the converter. Regenerate with
``python -m glass_diffusion.nodes.example_workflows`` (from outside the repo root, so that
``glass_diffusion`` is the installed package).

Every workflow but inpaint_9channel and sd2_v_rescale_cfg (which need a user's checkpoint) runs on the built-in model "glass-tiny (built-in)" (sd_core/builtin), so it
needs no downloaded file: 64x64 pixels, prompts from its toy grammar (sd_core/toy_data.py), cfg 2. For an
SD 1.5 checkpoint, pick it in the loader and raise the sizes (512 px), cfg (7-8) and prompts to suit.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..sd_core import builtin
from ..sd_core.toy_data import SIZES, Scene, draw, shape_centre
from . import shipped

PACK_ID = "glass-diffusion"          # the registry name (pyproject [project] name): ComfyUI-Manager's cnr_id
PACK_REPO = "glass-diffusion/glass-diffusion"  # aux_id: the GitHub repository
PACK_VERSION = "0.1.0"
BUILTIN = builtin.NAME              # the default checkpoint of the shipped workflows (ships with the package)
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # a user's SD 1.5 checkpoint (the tests write a tiny one by this name)
INPAINT_CHECKPOINT = "sd-v1-5-inpainting.safetensors"
SD2_V_CHECKPOINT = "v2-1_768-ema-pruned.safetensors"  # a user's SD 2.1 768-v checkpoint
# The input images the workflows load, drawn by our own code and shipped in workflows/input/ (nodes/shipped.py):
# found by bare name in the input folder first, then in the package. A glass-tiny scene, and the same scene
# with an alpha hole over its shape (LoadImage's mask = 1 - alpha: the hole is what inpainting repaints).
INPUT_SCENE = Scene("red", "circle", "large", 1, 1, "blue")  # "a large red circle in the center on a blue background"
INPUT_IMAGE = "glass_scene.png"
INPUT_MASKED = "glass_scene_masked.png"
WORKFLOWS_DIR = shipped.WORKFLOWS_DIR
# Layout (editor coordinates; a node's pos is the top-left of its body, its 30 px title bar sits above it):
# columns follow the data flow left to right as in ComfyUI's default graph, each node in the column after its
# latest input (a node with no inputs in the column before its first consumer); titled groups are horizontal bands.
ORIGIN = (70, 180)  # the first body: its title clear of the editor's menu, workflow tabs and side bar
TITLE, GAP, COLUMN_GAP, GROUP_PAD, GROUP_TITLE = 30, 30, 40, 10, 56  # group title: its text, then the badges
SOCKET_ROW, WIDGET_ROW = 20, 24


def node_size(n_sockets: int, n_widgets: int, multiline: bool = False, image: bool = False) -> list[int]:
    """[width, height] of a node body as ComfyUI's editor sizes it: 20 px per socket row (inputs beside outputs),
    6 px padding, 24 px per widget row plus 8; a multiline text box and an image preview take more. Widths: 210
    for nodes with at most one widget, 300 with more, 340 for a prompt box (text_to_image fits 1600 px)."""
    height = n_sockets * SOCKET_ROW + 6 + (n_widgets * WIDGET_ROW + 8 if n_widgets else 0)
    if multiline:
        height += 100  # the text box beyond its widget row
    if image:
        height = max(height, 314)  # image widget + upload button + the picture (ComfyUI's LoadImage default)
    width = 340 if multiline else (300 if n_widgets > 1 or image else 210)
    return [width, height]


class Graph:
    """A workflow under construction: ``n = g.add(type, title=None, **inputs)``; ``n[i]`` is output i;
    ``g.group(title, *nodes)`` draws a titled box around a stage (each group is a band below the previous ones)."""

    def __init__(self, registry: dict):
        self.registry, self.nodes, self.groups = registry, [], []

    def add(self, type_: str, title: str | None = None, **inputs):
        node = _Node(len(self.nodes) + 1, type_, title, inputs)
        self.nodes.append(node)
        return node

    def group(self, title: str, *nodes) -> None:
        self.groups.append((title, list(nodes)))

    # --- API format
    def api(self) -> dict:
        from .workflow import input_specs
        out = {}
        for n in self.nodes:
            inputs = {k: ([str(v.node.id), v.slot] if isinstance(v, _Out) else v) for k, v in n.inputs.items()}
            for s in input_specs(self.registry[n.type]).values():  # widgets left out get their defaults
                if s.is_widget and s.name not in inputs:
                    inputs[s.name] = s.options.get("default", (s.combo or [None])[0])
            entry = {"class_type": n.type, "inputs": inputs}
            if n.title:
                entry["_meta"] = {"title": n.title}
            out[str(n.id)] = entry
        return out

    # --- layout
    def _columns(self) -> dict:
        """Node id -> column: one after its latest input; a node without inputs just before its first consumer."""
        col = {}
        for n in self._topological():
            ups = [v.node.id for v in n.inputs.values() if isinstance(v, _Out)]
            col[n.id] = 1 + max((col[u] for u in ups), default=-1)
        for n in reversed(self._topological()):
            if not any(isinstance(v, _Out) for v in n.inputs.values()):
                users = [m.id for m in self.nodes if any(isinstance(v, _Out) and v.node is n for v in m.inputs.values())]
                if users:
                    col[n.id] = max(col[n.id], min(col[u] for u in users) - 1)
        return col

    def _layout(self, sizes: dict) -> tuple[dict, list]:
        """(node id -> pos, groups as UI dicts). Ungrouped nodes first, then each group as a band; a band starts
        below whatever is already in its columns and never above the band before it."""
        col = self._columns()
        widths = {}
        for nid, c in col.items():
            widths[c] = max(widths.get(c, 0), sizes[nid][0])
        xs, x = {}, ORIGIN[0]
        for c in sorted(widths):
            xs[c], x = x, x + widths[c] + COLUMN_GAP
        grouped = {n.id for _, members in self.groups for n in members}
        bands = [(None, [n for n in self.nodes if n.id not in grouped])] + list(self.groups)
        bottom = {c: ORIGIN[1] - TITLE for c in widths}  # the free y (title top) of each column
        pos, groups, band_top = {}, [], ORIGIN[1] - TITLE
        for title, members in bands:
            if not members:
                continue
            cols = sorted({col[n.id] for n in members})
            top = max([band_top] + [bottom[c] for c in cols])
            band_top = top
            y0 = top + (GROUP_TITLE + GROUP_PAD if title else 0)
            for c in cols:
                y = y0
                for n in (m for m in members if col[m.id] == c):
                    pos[n.id] = [xs[c], y + TITLE]
                    y += TITLE + sizes[n.id][1] + GAP
                bottom[c] = y
            if title:  # the box spans its columns: everything later in them goes below it
                left, right = xs[cols[0]] - GROUP_PAD, xs[cols[-1]] + widths[cols[-1]] + GROUP_PAD
                low = max(pos[n.id][1] + sizes[n.id][1] for n in members) + GROUP_PAD
                groups.append({"title": title, "bounding": [left, top, right - left, low - top],
                               "color": "#3f789e", "font_size": 24, "flags": {}})
                for c in range(cols[0], cols[-1] + 1):
                    bottom[c] = max(bottom[c], low + GAP)
        return pos, groups

    # --- UI format (0.4)
    def ui(self) -> dict:
        from .workflow import input_specs
        links, link_id = [], 0
        in_links: dict = {}       # (node id, input name) -> link id
        out_links: dict = {}      # (node id, slot) -> [link ids]
        order = {n.id: i for i, n in enumerate(self._topological())}
        for n in self.nodes:
            specs = input_specs(self.registry[n.type])
            sockets = [s for s in specs.values() if not s.is_widget and s.category != "hidden"]
            for slot, spec in enumerate(sockets):
                v = n.inputs.get(spec.name)
                if isinstance(v, _Out):
                    link_id += 1
                    out_type = self.registry[v.node.type].RETURN_TYPES[v.slot]
                    links.append([link_id, v.node.id, v.slot, n.id, slot, out_type])
                    in_links[(n.id, spec.name)] = link_id
                    out_links.setdefault((v.node.id, v.slot), []).append(link_id)
        nodes, sizes, parts = [], {}, {}
        for n in self.nodes:
            cls = self.registry[n.type]
            specs = input_specs(cls)
            sockets = [s for s in specs.values() if not s.is_widget and s.category != "hidden"]
            widgets = []
            for s in specs.values():
                if s.is_widget:
                    value = n.inputs.get(s.name, s.options.get("default", (s.combo or [None])[0]))
                    widgets.append(value)
                    if s.has_control:
                        widgets.append("fixed")
            names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
            multiline = any(s.options.get("multiline") for s in specs.values() if s.is_widget)
            image = any(s.options.get("image_upload") for s in specs.values())
            sizes[n.id] = node_size(max(len(sockets), len(names)), len(widgets), multiline, image)
            parts[n.id] = (cls, sockets, widgets, names)
        pos, groups = self._layout(sizes)
        for n in self.nodes:
            cls, sockets, widgets, names = parts[n.id]
            node = {
                "id": n.id, "type": n.type, "pos": pos[n.id], "size": sizes[n.id],
                "flags": {}, "order": order[n.id], "mode": 0,
                "inputs": [{"name": s.name, "type": s.type_name, "link": in_links.get((n.id, s.name))}
                           for s in sockets],
                "outputs": [{"name": name, "type": typ, "links": out_links.get((n.id, i), []), "slot_index": i}
                            for i, (name, typ) in enumerate(zip(names, cls.RETURN_TYPES))],
                "properties": {"cnr_id": PACK_ID, "aux_id": PACK_REPO, "ver": PACK_VERSION,
                               "Node name for S&R": n.type},
                "widgets_values": widgets,
            }
            if n.title:
                node["title"] = n.title
            nodes.append(node)
        return {"last_node_id": len(self.nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
                "groups": groups, "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}

    def _topological(self):
        done, out = set(), []

        def visit(n):
            if n.id in done:
                return
            for v in n.inputs.values():
                if isinstance(v, _Out):
                    visit(v.node)
            done.add(n.id)
            out.append(n)
        for n in self.nodes:
            visit(n)
        return out


class _Node:
    def __init__(self, id_, type_, title, inputs):
        self.id, self.type, self.title, self.inputs = id_, type_, title, inputs

    def __getitem__(self, slot: int) -> "_Out":
        return _Out(self, slot)


class _Out:
    def __init__(self, node: _Node, slot: int):
        self.node, self.slot = node, slot


SIZE = builtin.RESOLUTION  # 64: the built-in model's native size
STEPS, CFG = builtin.DEFAULTS["steps"], builtin.DEFAULTS["cfg"]
PROMPT = "a red circle in the center on a blue background"  # the built-in model's grammar (sd_core/toy_data.py)
NEGATIVE = ""  # the built-in model learnt the empty prompt as its unconditional one
SD15_NEGATIVE = "blurry, low quality, watermark, text"


def _base(g: Graph, ckpt: str = BUILTIN, prompt: str = PROMPT, negative: str = NEGATIVE):
    loader = g.add("GlassCheckpointLoader", "Checkpoint", ckpt_name=ckpt, weight_dtype="auto")
    pos = g.add("GlassTextEncode", "Positive", clip=loader[1], text=prompt, weighting="comfy")
    neg = g.add("GlassTextEncode", "Negative", clip=loader[1], text=negative, weighting="comfy")
    return loader, pos, neg


def _ksampler(g, title, loader, pos, neg, latent, seed=42, steps=STEPS, cfg=CFG, denoise=1.0,
              sampler="euler", scheduler="normal"):
    return g.add("GlassKSampler", title, unet=loader[0], seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                 scheduler=scheduler, positive=pos[0], negative=neg[0], latent_image=latent, denoise=denoise)


def text_to_image(g: Graph):
    """Prompt -> empty latent -> KSampler -> decode -> save."""
    loader, pos, neg = _base(g)
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=1)
    ks = _ksampler(g, "Sampler", loader, pos, neg, empty[0])
    image = g.add("GlassVAEDecode", "Decode", samples=ks[0], vae=loader[2])
    g.add("GlassSaveImage", "Save", images=image[0], filename_prefix="txt2img")


def image_to_image(g: Graph):
    """Load an image (the shipped glass_scene.png, a red circle on blue, unless the input folder has one of that name), encode it, re-noise to denoise 0.7 and sample it back towards the prompt (a green square)."""
    loader, pos, neg = _base(g, prompt="a large green square in the center on a blue background")
    load = g.add("GlassLoadImage", "Load Image", image=INPUT_IMAGE)
    enc = g.add("GlassVAEEncode", "Encode", pixels=load[0], vae=loader[2])
    ks = _ksampler(g, "Sampler", loader, pos, neg, enc[0], denoise=0.7)
    image = g.add("GlassVAEDecode", "Decode", samples=ks[0], vae=loader[2])
    g.add("GlassSaveImage", "Save", images=image[0], filename_prefix="img2img")


def inpaint_noise_mask(g: Graph):
    """Inpainting with an ordinary 4-channel model: the image's alpha becomes a noise mask (the shipped glass_scene_masked.png has a transparent square over its red circle); only the masked area is resampled (a green circle)."""
    loader, pos, neg = _base(g, prompt="a large green circle in the center on a blue background")
    load = g.add("GlassLoadImage", "Load Image", image=INPUT_MASKED)
    enc = g.add("GlassVAEEncode", "Encode", pixels=load[0], vae=loader[2])
    masked = g.add("GlassSetNoiseMask", "Noise Mask", samples=enc[0], mask=load[1])
    ks = _ksampler(g, "Sampler", loader, pos, neg, masked[0], denoise=1.0)
    image = g.add("GlassVAEDecode", "Decode", samples=ks[0], vae=loader[2])
    g.add("GlassSaveImage", "Save", images=image[0], filename_prefix="inpaint_mask")


def inpaint_9channel(g: Graph):
    """Inpainting with a 9-channel inpainting checkpoint: masked pixels greyed, mask grown by 6 px (VAE Encode for Inpainting). Needs a 9-channel model such as sd-v1-5-inpainting.safetensors in models/checkpoints (the built-in model cannot run it); loads glass_scene_masked.png, so give it your own 512 px picture with a transparent area."""
    loader, pos, neg = _base(g, ckpt=INPAINT_CHECKPOINT, prompt="a red wooden door", negative=SD15_NEGATIVE)
    load = g.add("GlassLoadImage", "Load Image", image=INPUT_MASKED)
    enc = g.add("GlassVAEEncodeForInpaint", "Encode for Inpainting", pixels=load[0], vae=loader[2],
                mask=load[1], grow_mask_by=6)
    ks = _ksampler(g, "Sampler", loader, pos, neg, enc[0], cfg=7.5, denoise=1.0)
    image = g.add("GlassVAEDecode", "Decode", samples=ks[0], vae=loader[2])
    g.add("GlassSaveImage", "Save", images=image[0], filename_prefix="inpaint_9ch")


def sd2_v_rescale_cfg(g: Graph):
    """SD 2.x v-prediction at 768 px: the sampling set to v_prediction (Model Sampling Discrete), RescaleCFG 0.7 against over-exposure at cfg 7. Needs an SD 2.x 768-v checkpoint such as v2-1_768-ema-pruned.safetensors in models/checkpoints (the built-in model is SD 1.x-shaped)."""
    loader, pos, neg = _base(g, ckpt=SD2_V_CHECKPOINT, prompt="a lighthouse on a cliff at sunset, oil painting",
                             negative=SD15_NEGATIVE)
    ms = g.add("GlassModelSamplingDiscrete", "Model Sampling", unet=loader[0], sampling="v_prediction", zsnr=False)
    rescale = g.add("GlassRescaleCFG", "Rescale CFG", unet=ms[0], multiplier=0.7)
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=768, height=768, batch_size=1)
    ks = g.add("GlassKSampler", "Sampler", unet=rescale[0], seed=42, steps=20, cfg=7.0, sampler_name="euler",
               scheduler="normal", positive=pos[0], negative=neg[0], latent_image=empty[0], denoise=1.0)
    image = g.add("GlassVAEDecode", "Decode", samples=ks[0], vae=loader[2])
    g.add("GlassSaveImage", "Save", images=image[0], filename_prefix="sd2_v")


def hires_fix(g: Graph):
    """Two-stage hires fix: 64 px pass, latent upscale to 128 px, second pass at denoise 0.3, decode through VAE Decode Tiled set to one 128 px tile (glass-tiny only saw 64 px: more denoise loses the colour, and its VAE shifts colours between tiles). For SD 1.5: 512 -> 768 px, denoise about 0.5, tiles of 512."""
    loader, pos, neg = _base(g)
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=1)
    first = _ksampler(g, "First Pass", loader, pos, neg, empty[0])
    up = g.add("GlassLatentUpscale", "Upscale", samples=first[0], upscale_method="nearest-exact",
               width=2 * SIZE, height=2 * SIZE, crop="disabled")
    second = _ksampler(g, "Second Pass", loader, pos, neg, up[0], seed=43, denoise=0.3)
    image = g.add("GlassVAEDecodeTiled", "Decode", samples=second[0], vae=loader[2], tile_size=2 * SIZE, overlap=32)
    save = g.add("GlassSaveImage", "Save", images=image[0], filename_prefix="hires")
    g.group("1. First pass (64 px)", empty, first)
    g.group("2. Upscale and second pass (128 px)", up, second, image, save)


def step_by_step(g: Graph):
    """One 12-step karras schedule split over three Denoise Steps nodes; each stage's x0 estimate is decoded and saved, plus a UNet Predict of the stage-1 latent."""
    loader, pos, neg = _base(g, prompt="a large yellow circle at the top left on a black background")
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=1)
    sched = g.add("GlassScheduler", "Schedule", unet=loader[0], scheduler="karras", steps=12, denoise=1.0)
    sampler = g.add("GlassSamplerSelect", "Sampler Choice", sampler_name="euler")
    latent, stages = empty[0], ((0, 4), (4, 8), (8, 12))
    for i, (start, end) in enumerate(stages, 1):
        steps = g.add("GlassDenoiseSteps", f"Steps {start}-{end}", unet=loader[0], positive=pos[0],
                      negative=neg[0], sampler=sampler[0], sigmas=sched[0], latent_image=latent,
                      add_noise=(i == 1), noise_seed=42, cfg=CFG, start_step=start, end_step=end)
        x0 = g.add("GlassVAEDecode", f"Decode x0 {i}", samples=steps[1], vae=loader[2])
        save = g.add("GlassSaveImage", f"Save x0 {i}", images=x0[0], filename_prefix=f"steps/stage{i}_x0")
        g.group(f"Stage {i}: steps {start}-{end}", steps, x0, save)
        latent = steps[0]
        if i == 1:  # what the UNet predicts for the stage-1 latent at the sigma it stopped at
            predict = g.add("GlassUNetPredict", "UNet Predict", unet=loader[0], positive=pos[0], negative=neg[0],
                            latent=steps[0], cfg=CFG, sigma=1.0, sigmas=sched[0], step=end)
            x0p = g.add("GlassVAEDecode", "Decode predicted x0", samples=predict[1], vae=loader[2])
            preview = g.add("GlassPreviewImage", "Preview predicted x0", images=x0p[0])
            g.group("UNet Predict of the stage-1 latent", predict, x0p, preview)
    final = g.add("GlassVAEDecode", "Decode final", samples=latent, vae=loader[2])
    save = g.add("GlassSaveImage", "Save final", images=final[0], filename_prefix="steps/final")
    g.group("Final latent", final, save)


def prompt_weighting(g: Graph):
    """The same weighted prompt encoded with ComfyUI's and AUTOMATIC1111's weighting, sampled side by side with one seed."""
    loader = g.add("GlassCheckpointLoader", "Checkpoint", ckpt_name=BUILTIN, weight_dtype="auto")
    prompt = "a small (purple:1.4) triangle at the top ((on a green background))"
    neg = g.add("GlassTextEncode", "Negative", clip=loader[1], text=NEGATIVE, weighting="comfy")
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=1)
    for mode in ("comfy", "a1111"):
        pos = g.add("GlassTextEncode", f"Positive ({mode})", clip=loader[1], text=prompt, weighting=mode)
        ks = _ksampler(g, f"Sampler ({mode})", loader, pos, neg, empty[0])
        image = g.add("GlassVAEDecode", f"Decode ({mode})", samples=ks[0], vae=loader[2])
        save = g.add("GlassSaveImage", f"Save ({mode})", images=image[0], filename_prefix=f"weighting_{mode}")
        g.group({"comfy": "ComfyUI weighting", "a1111": "AUTOMATIC1111 weighting"}[mode], pos, ks, image, save)


def clip_skip(g: Graph):
    """The same prompt through the last CLIP layer and the penultimate one (clip skip 2), side by side."""
    loader = g.add("GlassCheckpointLoader", "Checkpoint", ckpt_name=BUILTIN, weight_dtype="auto")
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=1)
    prompt = "a large orange circle on the right on a white background"
    for layer in (-1, -2):
        clip = g.add("GlassClipSkip", f"Clip Skip {layer}", clip=loader[1], stop_at_clip_layer=layer)
        pos = g.add("GlassTextEncode", f"Positive ({layer})", clip=clip[0], text=prompt, weighting="comfy")
        neg = g.add("GlassTextEncode", f"Negative ({layer})", clip=clip[0], text=NEGATIVE, weighting="comfy")
        ks = _ksampler(g, f"Sampler ({layer})", loader, pos, neg, empty[0])
        image = g.add("GlassVAEDecode", f"Decode ({layer})", samples=ks[0], vae=loader[2])
        save = g.add("GlassSaveImage", f"Save ({layer})", images=image[0], filename_prefix=f"clipskip{-layer}")
        g.group("Last CLIP layer (-1)" if layer == -1 else "Penultimate CLIP layer (-2: clip skip 2)",
                clip, pos, neg, ks, image, save)


def batch_of_seeds(g: Graph):
    """A batch of four latents from one seed (each gets its own noise), saved; one picked out of the batch and previewed."""
    loader, pos, neg = _base(g, prompt="a small red square at the bottom left on a yellow background")
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=4)
    ks = _ksampler(g, "Sampler", loader, pos, neg, empty[0], seed=1234)
    image = g.add("GlassVAEDecode", "Decode", samples=ks[0], vae=loader[2])
    g.add("GlassSaveImage", "Save", images=image[0], filename_prefix="batch")
    pick = g.add("GlassLatentFromBatch", "Pick", samples=ks[0], batch_index=2, length=1)
    one = g.add("GlassVAEDecode", "Decode picked", samples=pick[0], vae=loader[2])
    g.add("GlassPreviewImage", "Preview picked", images=one[0])


def scene_image():
    """glass_scene.png: INPUT_SCENE as the built-in model's training data draws it, 64x64 RGB."""
    from PIL import Image
    return Image.fromarray(draw(INPUT_SCENE, SIZE), "RGB")


def masked_scene_image():
    """glass_scene_masked.png: the same scene, alpha 0 in a square 4 px larger than the shape on each side."""
    import numpy as np
    from PIL import Image
    cx, cy = (round(v) for v in shape_centre(INPUT_SCENE, SIZE))
    r = SIZES["large"] + 4  # the large shape's half extent plus a margin
    alpha = np.full((SIZE, SIZE, 1), 255, np.uint8)
    alpha[cy - r:cy + r, cx - r:cx + r] = 0
    return Image.fromarray(np.concatenate([draw(INPUT_SCENE, SIZE), alpha], axis=-1), "RGBA")


INPUT_IMAGES = {INPUT_IMAGE: scene_image, INPUT_MASKED: masked_scene_image}

def lora(g: Graph):
    """The built-in LoRA teaches glass-tiny the shape word 'bar': the same prompt and seed with the LoRA (Load LoRA, strength 1) and without it, side by side."""
    loader = g.add("GlassCheckpointLoader", "Checkpoint", ckpt_name=BUILTIN, weight_dtype="auto")
    patched = g.add("GlassLoraLoader", "LoRA", unet=loader[0], clip=loader[1], lora_name="glass-tiny-bar (built-in)",
                    strength_model=1.0, strength_clip=1.0)
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=1)
    for tag, unet, clip in (("LoRA", patched[0], patched[1]), ("plain", loader[0], loader[1])):
        pos = g.add("GlassTextEncode", f"Positive ({tag})", clip=clip, text="a large red bar in the center on a "
                    "blue background", weighting="comfy")
        neg = g.add("GlassTextEncode", f"Negative ({tag})", clip=clip, text=NEGATIVE, weighting="comfy")
        ks = g.add("GlassKSampler", f"Sampler ({tag})", unet=unet, seed=42, steps=STEPS, cfg=CFG, sampler_name="euler",
                   scheduler="normal", positive=pos[0], negative=neg[0], latent_image=empty[0], denoise=1.0)
        image = g.add("GlassVAEDecode", f"Decode ({tag})", samples=ks[0], vae=loader[2])
        g.add("GlassSaveImage", f"Save ({tag})", images=image[0], filename_prefix=f"lora_{tag.lower()}")


def controlnet(g: Graph):
    """ControlNet: the prompt names the top left, the built-in silhouette ControlNet puts the shape where a drawn circle mask is (bottom right); the control image is previewed."""
    loader, pos, neg = _base(g, prompt="a large red circle at the top left on a blue background")
    shape = g.add("GlassShapeMask", "Silhouette", shape="circle", width=SIZE, height=SIZE, x=52.0, y=52.0, size=10.0)
    hint = g.add("GlassMaskToControlImage", "Control Image", mask=shape[0])
    g.add("GlassPreviewImage", "Preview control image", images=hint[0])
    net = g.add("GlassControlNetLoader", "ControlNet", control_net_name=builtin.CONTROLNET_NAME, weight_dtype="auto")
    applied = g.add("GlassControlNetApply", "Apply ControlNet", positive=pos[0], negative=neg[0], control_net=net[0],
                    image=hint[0], strength=1.0, start_percent=0.0, end_percent=1.0)
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=1)
    ks = g.add("GlassKSampler", "Sampler", unet=loader[0], seed=42, steps=STEPS, cfg=CFG, sampler_name="euler",
               scheduler="normal", positive=applied[0], negative=applied[1], latent_image=empty[0], denoise=1.0)
    image = g.add("GlassVAEDecode", "Decode", samples=ks[0], vae=loader[2])
    g.add("GlassSaveImage", "Save", images=image[0], filename_prefix="controlnet")


def attention_maps(g: Graph):
    """Attention maps: which word painted which pixels. Samples like the KSampler while recording the cross-attention; saves the picture and a labelled heat-map for the shape, its colour, its position and the background colour (the masks output gives the same maps as MASKs)."""
    loader = g.add("GlassCheckpointLoader", "Checkpoint", ckpt_name=BUILTIN, weight_dtype="auto")
    neg = g.add("GlassTextEncode", "Negative", clip=loader[1], text=NEGATIVE, weighting="comfy")
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=1)
    maps = g.add("GlassAttentionMaps", "Attention Maps", unet=loader[0], clip=loader[1], vae=loader[2],
                 text="a large red circle at the top left on a blue background", negative=neg[0],
                 latent_image=empty[0], seed=42, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
                 denoise=1.0, words="circle, red, left, blue", threshold=0.0, weighting="comfy")
    picture = g.add("GlassSaveImage", "Save picture", images=maps[0], filename_prefix="attention/picture")
    heat = g.add("GlassSaveImage", "Save heat-maps", images=maps[2], filename_prefix="attention/heatmap")
    g.group("Sample while recording the cross-attention", maps)
    g.group("The picture and one heat-map per word", picture, heat)


def step_film(g: Graph):
    """Step film: the x0 estimate and the noisy latent at each of 10 steps, side by side with the step and sigma on every frame; saved as an animated WebP and as PNG frames."""
    loader, pos, neg = _base(g, prompt="a large green square at the bottom right on a white background")
    empty = g.add("GlassEmptyLatent", "Empty Latent", width=SIZE, height=SIZE, batch_size=1)
    film = g.add("GlassStepFilm", "Step Film", unet=loader[0], positive=pos[0], negative=neg[0], vae=loader[2],
                 latent_image=empty[0], seed=42, steps=10, cfg=CFG, sampler_name="euler", scheduler="normal",
                 denoise=1.0)
    anim = g.add("GlassSaveAnimation", "Save animation", images=film[0], filename_prefix="film/step_film",
                 format="webp", fps=3.0, loop=0)
    frames = g.add("GlassSaveImage", "Save frames", images=film[0], filename_prefix="film/frame")
    g.group("Sample and film every step", film)
    g.group("Save the film", anim, frames)


WORKFLOWS = {
    "text_to_image": text_to_image,
    "image_to_image": image_to_image,
    "inpaint_noise_mask": inpaint_noise_mask,
    "inpaint_9channel": inpaint_9channel,
    "hires_fix": hires_fix,
    "step_by_step": step_by_step,
    "prompt_weighting": prompt_weighting,
    "clip_skip": clip_skip,
    "batch_of_seeds": batch_of_seeds,
    "lora": lora,
    "controlnet": controlnet,
    "sd2_v_rescale_cfg": sd2_v_rescale_cfg,
    "attention_maps": attention_maps,
    "step_film": step_film,
}


# Workflows that need a file the user must get: (models subfolder, file name, what it is). Every other workflow
# runs as shipped, on the built-in model and the shipped input images (tests/test_wheel.py runs them by name).
USER_FILES = {
    "inpaint_9channel": [("checkpoints", INPAINT_CHECKPOINT, "the SD 1.5 inpainting checkpoint, 9-channel UNet")],
    "sd2_v_rescale_cfg": [("checkpoints", SD2_V_CHECKPOINT, "an SD 2.x 768-v checkpoint (v-prediction)")],
}


def build(name: str, registry: dict | None = None) -> Graph:
    if registry is None:
        from .registry import NODE_CLASS_MAPPINGS as registry
    g = Graph(registry)
    WORKFLOWS[name](g)
    return g


def workflows_markdown() -> str:
    """The README's list of shipped workflows."""
    rows = ["| Workflow | What it shows |", "|---|---|"]
    rows += [f"| `workflows/{name}.json` | {' '.join(fn.__doc__.split())} |" for name, fn in WORKFLOWS.items()]
    return "\n".join(rows) + "\n"


def _dump(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_all(folder: Path = WORKFLOWS_DIR) -> list[Path]:
    """Write every workflow in both formats and the input images they load."""
    folder = Path(folder)
    (folder / "api").mkdir(parents=True, exist_ok=True)
    (folder / "input").mkdir(exist_ok=True)
    written = []
    for name, make in INPUT_IMAGES.items():
        make().save(folder / "input" / name, format="PNG", optimize=True)
        written.append(folder / "input" / name)
    for name in WORKFLOWS:
        g = build(name)
        for path, data in ((folder / f"{name}.json", g.ui()), (folder / "api" / f"{name}.json", g.api())):
            path.write_text(_dump(data), encoding="utf-8")
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all():
        print("wrote", p)
