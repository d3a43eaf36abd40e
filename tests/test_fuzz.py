"""A seeded, bounded fuzz suite: mutated shipped workflows (API and editor format, as dicts, JSON files and PNG
chunks, with hostile names and prompts) and mutated checkpoints. Every case must run, or fail with one of our own
error types whose message names the node / input or the file; never a raw exception, a case past its time limit,
memory past the budget, a file opened outside the allowed folders, or an output lost, overwritten or half-written.

Sizes (CI defaults, about a minute on 2 cores): GLASS_FUZZ_CASES workflow cases (100), GLASS_FUZZ_CHECKPOINT_CASES
checkpoint cases (30), GLASS_FUZZ_SEED (0). GLASS_FUZZ_REPORT=path writes the counts by outcome as JSON.
By hand: GLASS_FUZZ_CASES=10000 GLASS_FUZZ_CHECKPOINT_CASES=200 pytest -s tests/test_fuzz.py
"""
import copy
import faulthandler
import hashlib
import io
import json
import os
import random
import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from glass_diffusion.nodes import progress, runtime
from glass_diffusion.nodes.executor import Executor, GraphValidationError, NodeExecutionError, run_workflow
from glass_diffusion.nodes.progress import NonFiniteError
from glass_diffusion.nodes.registry import NODE_CLASS_MAPPINGS as REGISTRY
from glass_diffusion.nodes.types import NodeInputError
from glass_diffusion.nodes.workflow import convert_ui_to_api, input_specs, widget_slots
from glass_diffusion.sd_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from glass_diffusion.sd_core.prompt import EmbeddingError

from _ckpt_util import tiny_model
from _nodes_util import WORKFLOWS, rgba_image

CASES = int(os.environ.get("GLASS_FUZZ_CASES", "100"))
CHECKPOINT_CASES = int(os.environ.get("GLASS_FUZZ_CHECKPOINT_CASES", "30"))
SEED = int(os.environ.get("GLASS_FUZZ_SEED", "0"))
CASE_TIMEOUT_S = 120        # a case still running then is cancelled and counted as a hang
HARD_TIMEOUT_S = 600        # a case that ignores the cancel: the process is stopped with a traceback
MEMORY_BUDGET_GB = 6.0      # peak resident memory of the test process
RUN_LIMITS = dict(max_work=1e4, max_memory_gb=2.0)  # the runs' budget (tiny runs): refused at validation past it
NAMES = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
OUR_CAUSES = (NodeInputError, CheckpointError, NonFiniteError, EmbeddingError)


# ----------------------------------------------------------------------------- file-access guard

class _OpenGuard:
    """An audit hook recording every file opened while ``active`` outside the allowed folders."""

    def __init__(self):
        self.active, self.allowed, self.violations = False, [], []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if not self.active or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if not any(path == a or path.startswith(a + os.sep) for a in self.allowed):
            self.violations.append(path)


_GUARD = None


def guard() -> _OpenGuard:
    global _GUARD
    if _GUARD is None:
        _GUARD = _OpenGuard()
    return _GUARD


# ----------------------------------------------------------------------------- hostile values

def hostile_names(root: Path) -> list:
    return ["../secret/photo.png", "../../etc/hostname", "/etc/hostname", str(root / "secret" / "photo.png"),
            "..", ".", "", " ", "\x00", "a\x00b.png", "x" * 300, "sub/" * 40 + "x", "%width%/" * 30, "CON",
            "glass-tiny (built-in)", "example.png [output]", "example.png [temp]", "../input/x [output]",
            "missing.png", "é.png", "\\..\\..\\x", "example.png\n", "~/x.png", "$HOME/x", "a" * 5000]


def hostile_prompts() -> list:
    return ["(" * 40 + "a red circle" + ")" * 40, "(" * 900 + "x" + ")" * 900, "((a red circle:1e308))",
            "(a red circle:nan)", "(a:inf) (b:-inf)", "(x:1e-45)", "embedding:../../../etc/passwd",
            "embedding:", "\\(\\)" * 100, ")" * 500 + "(" * 500, "a, " * 3000, "\u202e\u200b\ufeff",
            "🙂" * 100, "a red circle" * 1000, "(:)", "(a:b:c:1.5)", "\x00\x01\x02", ""]


def hostile_values(rng: random.Random, root: Path) -> list:
    return [0, -1, 1, 2, 7, 8, 63, 64, 65, 2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63, 10 ** 30, 1e-9, 1e-6, 0.5, 1.5,
            -0.0, 1e308, float("nan"), float("inf"), -float("inf"), True, False, None, "", "x", "12", "1e3",
            [], [1], ["999", 0], ["1", 99], ["1", -1], ["1", 0, 0], [None, 0], {}, {"__value__": 3}, {"a": [1]},
            [[[[[[[[1]]]]]]]], rng.choice(hostile_names(root)), rng.choice(hostile_prompts())]


# ----------------------------------------------------------------------------- mutations

def valid_variation(api: dict, rng: random.Random) -> dict:
    """Values inside the schema (the runs that must succeed): seeds, samplers, schedulers, sizes, cfg, denoise."""
    from glass_diffusion.sd_core.samplers import SAMPLER_NAMES
    from glass_diffusion.sd_core.schedules import SCHEDULER_NAMES
    api = copy.deepcopy(api)
    for node in api.values():
        inputs, ct = node["inputs"], node["class_type"]
        if ct in ("GlassKSampler", "GlassSamplerSelect"):
            inputs["sampler_name"] = rng.choice(SAMPLER_NAMES)
        if ct in ("GlassKSampler", "GlassScheduler"):
            inputs["scheduler"] = rng.choice(SCHEDULER_NAMES)
            inputs["denoise"] = rng.choice([1.0, 1.0, 0.5, 0.05])
        for key in ("seed", "noise_seed"):
            if key in inputs:
                inputs[key] = rng.randrange(2 ** 64)
        if "cfg" in inputs:
            inputs["cfg"] = rng.choice([0.0, 1.0, 3.0, 30.0])
        if ct == "GlassEmptyLatent":
            inputs.update(width=rng.choice([16, 64, 96]), height=rng.choice([16, 64, 72]),
                          batch_size=rng.choice([1, 1, 2]))
        if ct == "GlassTextEncode":
            inputs["text"] = rng.choice(["a red circle", "(a blue square:1.3) on a green background", "", "((x))"])
    return api


def mutate_api(api: dict, rng: random.Random, root: Path) -> dict:
    if rng.random() < 0.2:
        return valid_variation(api, rng)
    api = copy.deepcopy(api)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not api:
            break
        nid = rng.choice(sorted(api))
        node = api[nid]
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            continue  # broken by an earlier mutation of this case
        cls = REGISTRY.get(node.get("class_type")) if isinstance(node.get("class_type"), str) else None
        names = [n for n, s in input_specs(cls).items() if s.category != "hidden"] if cls else []
        kind = rng.random()
        if kind < 0.45 and names:  # a hostile value for a declared input
            name = rng.choice(names)
            if name in ("image", "ckpt_name", "vae_name", "filename_prefix"):
                node["inputs"][name] = rng.choice(hostile_names(root))
            elif name == "text":
                node["inputs"][name] = rng.choice(hostile_prompts())
            else:
                node["inputs"][name] = rng.choice(hostile_values(rng, root))
        elif kind < 0.55 and names:
            node["inputs"].pop(rng.choice(names), None)
        elif kind < 0.62:
            node.setdefault("inputs", {})[rng.choice(["zzz", "sed", "Seed", "_meta"])] = rng.choice(
                [["999", 0], 1, "x"])
        elif kind < 0.68:
            node["class_type"] = rng.choice(["GlassKSamplr", "KSampler", "", 5, None] + sorted(REGISTRY))
        elif kind < 0.73:
            del api[nid]
        elif kind < 0.78:  # a link to itself or a later node: cycles
            if names:
                node["inputs"][rng.choice(names)] = [rng.choice(sorted(api)), rng.randrange(3)]
        elif kind < 0.82:
            api[nid] = rng.choice([None, [], "node", {"class_type": node.get("class_type"), "inputs": []}])
        elif kind < 0.86:
            api[str(rng.randrange(100, 10 ** 6))] = copy.deepcopy(node)
        elif kind < 0.9:  # a real run with a few more steps or a bigger batch: the budget decides
            for n in api.values():
                if isinstance(n, dict) and n.get("class_type") == "GlassEmptyLatent" and isinstance(n.get("inputs"), dict):
                    n["inputs"]["batch_size"] = rng.choice([2, 3, 16, 64])
                    n["inputs"]["width"] = rng.choice([64, 72, 128, 512, 16384])
        else:
            for n in api.values():  # denoise / steps extremes
                if isinstance(n, dict) and n.get("class_type") == "GlassKSampler" and isinstance(n.get("inputs"), dict):
                    n["inputs"]["denoise"] = rng.choice([1e-9, 1e-6, 1e-3, 0.0, 0.3])
                    n["inputs"]["steps"] = rng.choice([1, 2, 500, 10000])
    return api


def mutate_ui(ui: dict, rng: random.Random, root: Path) -> dict:
    ui = copy.deepcopy(ui)
    for _ in range(rng.choice([1, 1, 2])):
        nodes, links = ui.get("nodes") or [], ui.get("links") or []
        links = links if isinstance(links, list) else []
        kind = rng.random()
        if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
            break  # already broken beyond what the next mutations expect
        if kind < 0.35 and nodes:
            node = rng.choice(nodes)
            field = rng.choice(["widgets_values", "widgets_values", "id", "type", "mode", "inputs", "outputs", "title"])
            if field == "widgets_values" and isinstance(node.get("widgets_values"), list) and node["widgets_values"]:
                values = node["widgets_values"]
                choice = rng.random()
                if choice < 0.6:
                    i = rng.randrange(len(values))
                    values[i] = rng.choice(hostile_names(root) + hostile_prompts() + hostile_values(rng, root))
                elif choice < 0.8:
                    del values[rng.randrange(len(values)):]
                else:
                    values.extend(rng.choice(hostile_values(rng, root)) for _ in range(3))
            else:
                node[field] = rng.choice(hostile_values(rng, root) + [[{"name": 5}], [{"link": "x"}], [5]])
        elif kind < 0.55 and links:
            i = rng.randrange(len(links))
            old = links[i] if isinstance(links[i], list) and len(links[i]) >= 4 else [1, 1, 0, 1, 0, "X"]
            links[i] = rng.choice([None, [], [1], "link", {"id": 1}, [old[0], 999, 0, 1, 0, "X"],
                                   [old[0], old[1], 9, old[3], 0, "X"], [True, 1.5, 0, 1, 0, "X"]])
        elif kind < 0.65 and nodes and isinstance(nodes, list):
            nodes.pop(rng.randrange(len(nodes)))
        elif kind < 0.72 and nodes and isinstance(nodes, list):
            nodes.append(copy.deepcopy(rng.choice(nodes)))  # a duplicate id
        elif kind < 0.8 and nodes:
            node = rng.choice(nodes)
            sockets = node.get("inputs") or []
            if isinstance(sockets, list) and sockets and isinstance(sockets[0], dict):
                sockets[0]["link"] = rng.choice([None, 999, -1, "x", [1], 1, 2])
        elif kind < 0.86:
            ui[rng.choice(["nodes", "links"])] = rng.choice([None, {}, "x", 5, [None]])
        elif kind < 0.92 and nodes:
            rng.choice(nodes)["mode"] = rng.choice([2, 4, 4, 99])  # mute / bypass chains
        else:
            node = rng.choice(nodes) if nodes else None
            if node is not None:
                node["type"] = rng.choice(["Reroute", "PrimitiveNode", "Note", "a1b2c3d4-0000-0000-0000-000000000000"])
    return ui


# ----------------------------------------------------------------------------- serialisation

def as_png(path: Path, chunks: dict, rng: random.Random) -> Path:
    info = PngInfo()
    for k, v in chunks.items():
        info.add_text(k, v, zip=rng.random() < 0.3)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    data = buf.getvalue()
    if rng.random() < 0.1:
        data = data[: rng.randrange(8, len(data))]  # truncated
    elif rng.random() < 0.05:
        i = rng.randrange(8, len(data))
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]  # a flipped byte (CRC error)
    path.write_bytes(data)
    return path


def make_case(rng: random.Random, root: Path, base_api: dict, base_ui: dict, index: int):
    """(what to run: dict or path, description)."""
    name = rng.choice(NAMES)
    fmt = rng.choice(["api", "api", "ui", "ui"])
    doc = mutate_api(base_api[name], rng, root) if fmt == "api" else mutate_ui(base_ui[name], rng, root)
    how = rng.choice(["dict", "dict", "json", "json", "png"])
    nested = None
    if rng.random() < 0.03:  # nested arrays: as a dict (70 levels) or as text (2,000 levels, beyond json.dumps)
        n = 70 if how == "dict" else rng.choice([70, 2000])
        nested = '{"1": {"class_type": "GlassEmptyLatent", "inputs": {"width": ' + "[" * n + "]" * n + "}}}"
        doc = json.loads(nested) if how == "dict" else None
    desc = f"case {index}: {name} {fmt} as {how}"
    folder = root / "cases"
    if how == "dict":
        return doc, desc
    if how == "json":
        text = nested or json.dumps(doc)
        raw = text.encode("utf-8")
        r = rng.random()
        if r < 0.05:
            raw = raw.replace(b"a", b"\xe9", 1)  # not UTF-8
        elif r < 0.08:
            raw = raw[: rng.randrange(len(raw))]  # truncated JSON
        elif r < 0.1:
            raw = b"\xef\xbb\xbf" + raw  # a BOM is fine
        path = folder / f"c{index}.json"
        path.write_bytes(raw)
        return path, desc
    chunks = {"prompt": nested or json.dumps(doc)} if fmt == "api" else {"workflow": nested or json.dumps(doc)}
    r = rng.random()
    if r < 0.1:
        chunks = {"prompt": "{not json"}
    elif r < 0.15:
        chunks = {"workflow": "[" * 500 + "]" * 500}
    elif r < 0.2:
        chunks = {"parameters": "a1111 text"}
    elif r < 0.3 and fmt == "ui":
        chunks = {"prompt": json.dumps(base_api[name]), "workflow": json.dumps(doc)}
    return as_png(folder / f"c{index}.png", chunks, rng), desc


# ----------------------------------------------------------------------------- outcome of one case

def classify(exc: BaseException, source) -> str:
    """The outcome name of a failure; 'BAD: ...' when it is not one of ours, properly named."""
    if isinstance(exc, GraphValidationError):
        for e in exc.errors:
            if not str(e).strip() or (e.node_id is None and e.input_name is None and e.kind not in (
                    "invalid_prompt", "prompt_no_outputs", "invalid_workflow", "bad_override")):
                return f"BAD: unnamed graph error {e}"
        return "invalid: " + exc.errors[0].kind
    if isinstance(exc, NodeExecutionError):
        cause = exc.error
        if isinstance(cause, OUR_CAUSES) or type(cause) is ValueError:
            return f"node error: {exc.class_type} {type(cause).__name__}"
        return f"BAD: node {exc.class_type} raised {type(cause).__name__}: {cause}"
    if isinstance(exc, progress.Interrupted):
        return "BAD: hang (cancelled at the time limit)"
    if isinstance(exc, (ValueError, OSError)) and isinstance(source, Path) and str(source) in str(exc):
        return f"file error: {type(exc).__name__}"
    if type(exc) is ValueError and isinstance(source, dict) and str(exc).startswith("<dict>: "):
        return "invalid: document"  # a dict handed over directly: there is no file to name
    return f"BAD: {type(exc).__name__}: {exc}"


class Outputs:
    """Every output file seen so far with its hash: none may change or vanish, none may be half-written."""

    def __init__(self, *folders):
        self.folders, self.seen = folders, {}

    def check(self) -> list:
        """Problems since the last check (a file whose size, mtime or inode changed is hashed again)."""
        problems, now = [], {}
        for folder in self.folders:
            for p in Path(folder).rglob("*"):
                if p.is_file():
                    st = p.stat()
                    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
                    old = self.seen.get(p)
                    now[p] = old if old is not None and old[0] == stamp else (stamp, self._hash(p))
        for p, (_, h) in self.seen.items():
            if p not in now or now[p][1] != h:
                problems.append(f"output {p} was {'overwritten' if p in now else 'lost'}")
        for p in now.keys() - self.seen.keys():
            if p.name.endswith(".tmp"):
                problems.append(f"temp file left: {p}")
            elif p.suffix == ".png":
                try:
                    with Image.open(p) as im:
                        im.load()
                except Exception as e:
                    problems.append(f"half-written output {p}: {e}")
        self.seen = {p: v for p, v in now.items() if not p.name.endswith(".tmp")}
        return problems

    @staticmethod
    def _hash(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()


def reset_peak_rss() -> None:
    """Start the peak-memory window here: earlier tests in this process (the full-size SD 1.5 fixtures take
    ~10 GB) must not count against the fuzz budget. Linux resets the peak RSS on writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


def run_case(executor, target, source_desc):
    """Run one case under the time limit; returns the outcome name."""
    cancel = threading.Event()
    timer = threading.Timer(CASE_TIMEOUT_S, cancel.set)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(HARD_TIMEOUT_S, exit=True)
    try:
        with progress.cancel_scope(cancel):
            run_workflow(target, executor=executor)
        return "ran"
    except Exception as e:  # noqa: BLE001 (every failure is classified)
        return classify(e, target)
    finally:
        faulthandler.cancel_dump_traceback_later()
        timer.cancel()


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    for d in ("input", "output", "temp", "models/checkpoints", "models/vae", "models/embeddings", "cases", "ckpt",
              "secret"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rgba_image().save(root / "input" / "example.png")
    rgba_image(32).save(root / "secret" / "photo.png")
    (root / "secret" / "photo.png").with_suffix(".safetensors").write_bytes(b"secret")
    g = guard()
    g.allowed = [str(root / d) for d in ("input", "output", "temp", "models", "cases", "ckpt")] + [
        os.path.abspath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, str(WORKFLOWS.parent)}] + [
        "/proc", "/dev", "/sys", os.path.dirname(torch.__file__)]
    return root


def _report(name, counts):
    path = os.environ.get("GLASS_FUZZ_REPORT")
    if path:
        data = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        data[name] = dict(counts.most_common())
        Path(path).write_text(json.dumps(data, indent=2))
    print(f"\n{name}: " + ", ".join(f"{k}: {v}" for k, v in counts.most_common()))


def fewer_steps(api: dict, ui: dict) -> None:
    """The shipped workflows with at most 3 sampling steps per KSampler (the fuzz is about inputs, not pictures)."""
    for nid, node in api.items():
        if node["class_type"] == "GlassKSampler":
            node["inputs"]["steps"] = min(3, node["inputs"]["steps"])
            for n in ui["nodes"]:
                if str(n["id"]) == nid:
                    slots = widget_slots(REGISTRY["GlassKSampler"], len(n["widgets_values"]))
                    n["widgets_values"][slots.index("steps")] = node["inputs"]["steps"]


@pytest.mark.skipif(CASES == 0, reason="GLASS_FUZZ_CASES=0")
def test_fuzz_workflows(arena, monkeypatch):
    reset_peak_rss()
    rng = random.Random(SEED)
    base_api = {n: json.loads((WORKFLOWS / "api" / f"{n}.json").read_text()) for n in NAMES}
    base_ui = {n: json.loads((WORKFLOWS / f"{n}.json").read_text()) for n in NAMES}
    for n in NAMES:
        fewer_steps(base_api[n], base_ui[n])
        assert convert_ui_to_api(base_ui[n], REGISTRY) == base_api[n]  # the two bases still agree
    outputs = Outputs(arena / "output", arena / "temp")
    counts, bad = Counter(), []
    g = guard()
    monkeypatch.setenv("GLASS_DIFFUSION_TEMP", str(arena / "temp"))
    with runtime.settings_override(input_dir=arena / "input", output_dir=arena / "output",
                                   models_dir=arena / "models", device="cpu", dtype="fp32", **RUN_LIMITS):
        executor = Executor(REGISTRY)
        for i in range(CASES):
            target, desc = make_case(rng, arena, base_api, base_ui, i)
            g.violations.clear()
            g.active = True
            try:
                outcome = run_case(executor, target, desc)
            finally:
                g.active = False
            counts[outcome.split(":")[0] if outcome.startswith("BAD") else outcome] += 1
            problems = [outcome] if outcome.startswith("BAD") else []
            problems += [f"opened outside the allowed folders: {p}" for p in g.violations]
            problems += outputs.check()
            if peak_rss_gb() > MEMORY_BUDGET_GB:
                problems.append(f"peak memory {peak_rss_gb():.1f} GB over the {MEMORY_BUDGET_GB} GB budget")
            if problems:
                bad.append((desc, problems))
            if isinstance(target, Path):
                target.unlink(missing_ok=True)
    _report("workflows", counts)
    assert not bad, "\n".join(f"{d}: {p}" for d, p in bad[:20])
    assert counts["ran"] > 0 and sum(v for k, v in counts.items() if k.startswith("invalid")) > 0


# ----------------------------------------------------------------------------- checkpoints

def mutate_checkpoint(rng: random.Random, state: dict, meta: dict, folder: Path, i: int) -> Path:
    state = dict(state)
    meta = dict(meta)
    keys = sorted(state)
    kind = rng.random()
    if kind < 0.12:
        for k in rng.sample(keys, rng.choice([1, 3, 30])):
            del state[k]
    elif kind < 0.22:
        k = rng.choice(keys)
        t = state[k]
        state[k] = rng.choice([t.flatten(), t[..., :1].contiguous(), torch.zeros(0), t.unsqueeze(0).contiguous(),
                               torch.zeros(*[max(1, d + 1) for d in t.shape])])
    elif kind < 0.32:
        k = rng.choice(keys)
        state[k] = state[k].to(rng.choice([torch.int8, torch.uint8, torch.bool, torch.int32, torch.float16,
                                           torch.bfloat16, torch.float64]))
    elif kind < 0.4:
        k = rng.choice([k for k in keys if k.startswith(("model.", "first_stage_model."))])
        state[k] = state[k].float().fill_(rng.choice([float("nan"), float("inf"), 1e30]))
    elif kind < 0.5:
        pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
        state[pos] = rng.choice([state[pos] + 77, state[pos] - 1, state[pos].float() + 0.4, state[pos][:, :5],
                                 torch.full_like(state[pos], 2 ** 40), state[pos].to(torch.int8)])
    elif kind < 0.75:
        config = json.loads(meta["glass_diffusion.config"])
        part = rng.choice(sorted(config))
        field = rng.choice(sorted(config[part]))
        config[part][field] = rng.choice([0, -1, 100000, 10 ** 12, 1.5, "8", None, [], [0], [100000] * 50,
                                          {"a": 1}, True, float("nan")] if rng.random() < 0.9 else [3])
        if rng.random() < 0.1:
            config[part]["unknown_field"] = 1
        meta["glass_diffusion.config"] = json.dumps(config)
    elif kind < 0.82:
        meta["glass_diffusion.config"] = rng.choice(["{", "[]", "5", "null", "[" * 3000 + "]" * 3000,
                                                     json.dumps({"unet": 5})])
    elif kind < 0.86:
        for k in rng.sample(keys, 5):
            state[k.replace("model.", "model.zzz.", 1)] = state.pop(k)
    path = folder / f"k{i}.safetensors"
    try:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    except Exception:
        path.write_bytes(b"")
    r = rng.random()
    if r < 0.06:
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data) or 1)])  # truncated
    elif r < 0.09:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))  # noise
    elif r < 0.13:
        pickle_path = path.with_suffix(rng.choice([".ckpt", ".pt"]))
        torch.save(rng.choice([{"state_dict": state}, state, [1, 2], {"a": "b"}, {"x": torch.nn.Linear(2, 2)}]),
                   pickle_path)
        path.unlink()
        path = pickle_path
    return path


@pytest.mark.skipif(CHECKPOINT_CASES == 0, reason="GLASS_FUZZ_CHECKPOINT_CASES=0")
def test_fuzz_checkpoints(arena):
    reset_peak_rss()
    rng = random.Random(SEED + 1)
    good = save_checkpoint(tiny_model(), arena / "ckpt" / "good.safetensors")
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    counts, bad = Counter(), []
    for i in range(CHECKPOINT_CASES):
        path = mutate_checkpoint(rng, state, meta, arena / "ckpt", i)
        t0 = time.perf_counter()
        faulthandler.dump_traceback_later(HARD_TIMEOUT_S, exit=True)
        try:
            load_checkpoint(path)
            outcome = "loaded"
        except CheckpointError as e:
            outcome = "refused: CheckpointError" if str(path) in str(e) else f"BAD: unnamed {e}"
        except Exception as e:  # noqa: BLE001
            outcome = f"BAD: {type(e).__name__}: {e}"
        finally:
            faulthandler.cancel_dump_traceback_later()
        if time.perf_counter() - t0 > CASE_TIMEOUT_S:
            outcome = f"BAD: took {time.perf_counter() - t0:.0f} s"
        counts[outcome.split(":")[0] if outcome.startswith("BAD") else outcome] += 1
        if outcome.startswith("BAD"):
            bad.append((path.name, outcome))
        path.unlink(missing_ok=True)
    _report("checkpoints", counts)
    assert not bad, "\n".join(f"{n}: {o}" for n, o in bad[:20])
    assert counts["loaded"] > 0 and counts["refused: CheckpointError"] > 0
