"""LoRA loader nodes in graphs: a LoRA branch never changes the plain branch or a later run (bitwise), chained
loaders stack in order, strength 0 is the input itself, bad files are refused naming node, input and file;
and the AUTOMATIC1111 `parameters` chunk of a saved PNG re-parses field by field."""
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from _lora_util import kohya_file, kohya_targets
from _nodes_util import CHECKPOINT, saved_pngs, tiny_env, tiny_sd

from glass_diffusion.nodes.executor import Executor, NodeExecutionError
from glass_diffusion.nodes.validation import GraphValidationError
from glass_diffusion.nodes.lora import GlassLoraLoader
from glass_diffusion.nodes.registry import NODE_CLASS_MAPPINGS
from glass_diffusion.nodes.types import NodeInputError
from glass_diffusion.sd_core.lora import LoraPatch, view_for

LORA, LORA2 = "style.safetensors", "sub/other.safetensors"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = tiny_env(tmp_path_factory)
    loras = env.models / "loras"
    (loras / "sub").mkdir(parents=True, exist_ok=True)
    model = tiny_sd(1)  # the architecture of the test checkpoints (names and shapes)
    targets = {"unet": kohya_targets(model.unet, conv3x3=True), "clip": kohya_targets(model.clip, False)}
    for name, seed in ((LORA, 11), (LORA2, 12)):
        if not (loras / name).exists():
            kohya_file(loras / name, targets, seed=seed, rank=4, alpha=4.0)
    return env


def _graph(seed=3, lora=True, plain=True, strength=1.0, loras=(LORA,)):
    g = {"ckpt": {"class_type": "GlassCheckpointLoader", "inputs": {"ckpt_name": CHECKPOINT, "weight_dtype": "fp32"}},
         "latent": {"class_type": "GlassEmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}

    def branch(tag, unet, clip):
        g[f"pos_{tag}"] = {"class_type": "GlassTextEncode", "inputs": {"clip": clip, "text": "a red circle",
                                                                        "weighting": "comfy"}}
        g[f"neg_{tag}"] = {"class_type": "GlassTextEncode", "inputs": {"clip": clip, "text": "blurry",
                                                                        "weighting": "comfy"}}
        g[f"ks_{tag}"] = {"class_type": "GlassKSampler", "inputs": {
            "unet": unet, "seed": seed, "steps": 2, "cfg": 6.5, "sampler_name": "euler_ancestral",
            "scheduler": "karras", "positive": [f"pos_{tag}", 0], "negative": [f"neg_{tag}", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}}
        g[f"dec_{tag}"] = {"class_type": "GlassVAEDecode", "inputs": {"samples": [f"ks_{tag}", 0], "vae": ["ckpt", 2]}}
        g[f"save_{tag}"] = {"class_type": "GlassSaveImage", "inputs": {"images": [f"dec_{tag}", 0],
                                                                        "filename_prefix": tag}}

    if lora:
        unet, clip = ["ckpt", 0], ["ckpt", 1]
        for i, name in enumerate(loras):
            g[f"lora{i}"] = {"class_type": "GlassLoraLoader", "inputs": {
                "unet": unet, "clip": clip, "lora_name": name, "strength_model": strength, "strength_clip": strength}}
            unet, clip = [f"lora{i}", 0], [f"lora{i}", 1]
        branch("lora", unet, clip)
    if plain:
        branch("plain", ["ckpt", 0], ["ckpt", 1])
    return g


def _run(ex, graph):
    result = ex.run(graph)
    return {k.removeprefix("dec_"): result.output(k) for k in graph if k.startswith("dec_")}


def test_lora_branch_leaves_the_plain_branch_and_later_runs_bitwise_alone(env, tmp_path):
    with env.settings(tmp_path):
        reference = _run(Executor(NODE_CLASS_MAPPINGS), _graph(lora=False))["plain"]
        ex = Executor(NODE_CLASS_MAPPINGS)  # one executor: the loaded checkpoint is cached and shared
        both = _run(ex, _graph())
        assert torch.equal(both["plain"], reference)
        assert (both["lora"] - reference).abs().max() > 1e-3  # the LoRA does change its own branch
        # a later run on the same cached model, at a seed not computed before: as a fresh plain run
        later = _run(ex, _graph(seed=4, lora=False))["plain"]
        assert torch.equal(later, _run(Executor(NODE_CLASS_MAPPINGS), _graph(seed=4, lora=False))["plain"])


def test_chained_loaders_stack_in_order_and_strength_zero_is_the_input(env, tmp_path):
    from glass_diffusion.nodes.loaders import GlassCheckpointLoader
    with env.settings(tmp_path):
        unet, clip, _ = GlassCheckpointLoader().load(CHECKPOINT, "fp32")
        u1, c1 = GlassLoraLoader().load(unet, clip, LORA, 0.8, -0.5)
        u2, c2 = GlassLoraLoader().load(u1, c1, LORA2, 1.5, 0.0)
        assert [p.source for p in u2.model.patches] == ["style.safetensors", "other.safetensors"]
        assert [p.strength for p in u2.model.patches] == [0.8, 1.5]
        assert c2 is c1 and [p.strength for p in c1.patches] == [-0.5]  # strength_clip 0: clip unchanged
        assert unet.model.patches == () and clip.patches == ()  # the inputs are never modified
        assert u2.model.unet is unet.model.unet  # one set of loaded weights
        u0, c0 = GlassLoraLoader().load(unet, clip, LORA, 0.0, 0.0)
        assert u0 is unet and c0 is clip
        assert clip.patched_model() is clip.model
        # the view is computed once per handle and reused by every sampler using it
        view = view_for(u2.model, u2.model.unet, u2.model.patches)
        assert view is view_for(u2.model, u2.model.unet, u2.model.patches) and view is not unet.model.unet
        assert all(isinstance(p, LoraPatch) for p in u2.model.patches)


def test_sd2_lora_patches_open_clip_and_unet_through_the_loader(env, tmp_path):
    """An SD 2.x checkpoint: a kohya file for its UNet and its text encoder (Hugging Face names, q / k / v on the
    packed in_proj) changes the LoRA branch's conditioning, never the plain clip's."""
    from _nodes_util import SD2_V_CHECKPOINT

    from glass_diffusion.nodes.loaders import GlassCheckpointLoader
    from glass_diffusion.nodes.text import GlassTextEncode
    from glass_diffusion.sd_core.lora import hf_clip_slots
    with env.settings(tmp_path):
        unet, clip, _ = GlassCheckpointLoader().load(SD2_V_CHECKPOINT, "fp32")
        te = []  # (Hugging Face name, shape of the weight or row block it lands on)
        for hf, slot in hf_clip_slots(clip.model).items():
            param, rows = slot.target("weight")
            w = getattr(clip.model.get_submodule(slot.module), param)
            if "self_attn" in hf or "mlp" in hf:
                te.append((hf, tuple((w if rows is None else w[rows[0]:rows[1]]).shape)))
        assert len(te) == 6 * clip.model.config.layers
        name = "sd2_style.safetensors"
        kohya_file(env.models / "loras" / name, {"unet": kohya_targets(unet.model.unet, False), "clip": te}, seed=21)
        (plain,) = GlassTextEncode().encode(clip, "a red circle", "comfy")
        u, c = GlassLoraLoader().load(unet, clip, name, 1.0, 1.0)
        (patched,) = GlassTextEncode().encode(c, "a red circle", "comfy")
        (again,) = GlassTextEncode().encode(clip, "a red circle", "comfy")
        assert (patched[0][0] - plain[0][0]).abs().max() > 1e-3
        assert torch.equal(again[0][0], plain[0][0])
        assert any(k.endswith("in_proj_weight[0:32]") for k in c.patches[0].adapters)
        assert any(k.endswith("proj_in.weight") for k in u.model.patches[0].adapters)
    (env.models / "loras" / name).unlink()


@pytest.mark.parametrize("bad", ["missing", "corrupt"])
def test_bad_lora_file_names_node_input_and_file(env, tmp_path, bad):
    from glass_diffusion.nodes.loaders import GlassCheckpointLoader
    name = "nope.safetensors"
    if bad == "corrupt":
        (env.models / "loras" / name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with env.settings(tmp_path):
        unet, clip, _ = GlassCheckpointLoader().load(CHECKPOINT, "fp32")
        with pytest.raises(NodeInputError) as e:
            GlassLoraLoader().load(unet, clip, name, 1.0, 1.0)
        assert e.value.node == "GlassLoraLoader" and e.value.input_name == "lora_name" and name in str(e.value)
        with pytest.raises((NodeExecutionError, GraphValidationError), match="lora_name.*nope.safetensors"):
            g = _graph(plain=False, loras=(name,))
            Executor(NODE_CLASS_MAPPINGS).run(g)
    (env.models / "loras" / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ A1111 infotext
# AUTOMATIC1111's own reading of the last line (modules/infotext_utils.py: `re_param_code`, values in
# double quotes are JSON strings), written here from its documented format
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    fields = {k: json.loads(v) if v.startswith('"') else v for k, v in RE_PARAM.findall(last)}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields["Prompt"], fields["Negative prompt"] = "\n".join(prompt), "\n".join(negative)
    return fields


def _after_header_sha256(path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_a1111_parameters_chunk_parses_field_by_field(env, tmp_path):
    sd_parsers = pytest.importorskip("sd_parsers")
    with env.settings(tmp_path):
        Executor(NODE_CLASS_MAPPINGS).run(_graph(seed=123456, strength=0.75, loras=(LORA, LORA2)))
    files = {p.name.split("_")[0]: p for p in saved_pngs(tmp_path)}
    assert set(files) == {"lora", "plain"}
    ckpt_hash = hashlib.sha256((env.models / "checkpoints" / CHECKPOINT).read_bytes()).hexdigest()[:10]
    lora_hashes = {n: _after_header_sha256(env.models / "loras" / n)[:12] for n in (LORA, LORA2)}

    with Image.open(files["lora"]) as im:
        text = im.text["parameters"]
        assert {"prompt", "workflow", "parameters"} <= set(im.text) or {"prompt", "parameters"} <= set(im.text)
    f = parse_a1111(text)
    assert f["Prompt"] == "a red circle <lora:style:0.75> <lora:other:0.75>"
    assert f["Negative prompt"] == "blurry"
    assert (f["Steps"], f["Sampler"], f["Schedule type"], f["CFG scale"], f["Seed"], f["Size"]) == \
        ("2", "Euler a", "Karras", "6.5", "123456", "64x64")
    assert (f["Model hash"], f["Model"]) == (ckpt_hash, CHECKPOINT.rsplit(".", 1)[0])
    assert f["Lora hashes"] == f"style: {lora_hashes[LORA]}, other: {lora_hashes[LORA2]}"
    assert "Version" in f

    # an image site's reader (the sd-parsers package) sees the same prompt, negative prompt, sampler and model
    info = sd_parsers.ParserManager().parse(files["lora"])
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    s = info.samplers[0]
    assert s.name == "Euler a" and s.model.hash == ckpt_hash
    assert s.prompts[0].value == f["Prompt"] and s.negative_prompts[0].value == "blurry"
    params = {k: str(v) for k, v in s.parameters.items()}
    assert {k: params.get(k) for k in ("cfg_scale", "seed", "steps", "scheduler")} == \
        {"cfg_scale": "6.5", "seed": "123456", "steps": "2", "scheduler": "Karras"}, params

    with Image.open(files["plain"]) as im:
        plain = parse_a1111(im.text["parameters"])
    assert plain["Prompt"] == "a red circle" and "Lora hashes" not in plain
    assert np.asarray(Image.open(files["plain"])).std() > 0
