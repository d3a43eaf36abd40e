"""Full-size SD 1.5: save_checkpoint writes exactly the real single-file layout, and loading an fp16 file as
fp32 peaks at about one fp32 copy of the weights plus the file's mapping (measured in a subprocess).

Everything here holds /tmp/glass_fullsize.lock: one full-size process at a time on this machine."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from glass_diffusion.sd_core.checkpoint import save_checkpoint
from glass_diffusion.sd_core.model import SDConfig, StableDiffusion
from glass_diffusion.sd_core.family import SD1

from _ckpt_util import fullsize_lock, read_tsv



@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """A random-weight fp16 SD 1.5 checkpoint written by save_checkpoint (built on meta, filled in fp16)."""
    path = tmp_path_factory.mktemp("fullsize") / "sd15_random.safetensors"
    with fullsize_lock():
        with torch.device("meta"):
            model = StableDiffusion(SDConfig.sd15(), SD1)
        model = model.half().to_empty(device="cpu")  # 2.1 GB, never an fp32 copy
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=gen)
            model.clip.text_model.embeddings.position_ids.copy_(torch.arange(77).unsqueeze(0))
        save_checkpoint(model, path, dtype=torch.float16)
        del model
    yield path
    path.unlink()


def test_saved_sd15_has_exactly_the_reference_keys_shapes_and_dtypes(sd15_file):
    expected = read_tsv()
    assert len(expected) == 1143
    with safe_open(str(sd15_file), "pt") as f:
        found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        meta = f.metadata()
        pos = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids")
    short = {"F16": "float16", "F32": "float32", "I64": "int64"}
    assert {k: (s, short[d]) for k, (s, d) in found.items()} == expected
    assert torch.equal(pos, torch.arange(77).unsqueeze(0))
    assert SDConfig.from_dict(json.loads(meta["glass_diffusion.config"])) == SDConfig.sd15()


MEASURE = textwrap.dedent("""
    import json, math, os, resource, sys, time
    import torch
    from safetensors import safe_open
    from glass_diffusion.sd_core.checkpoint import load_checkpoint

    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    path = sys.argv[1]
    base = rss_kib("VmHWM:")
    start = time.perf_counter()
    model = load_checkpoint(path, dtype=torch.float32)
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM:")
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dtypes = sorted({str(t.dtype) for t in model.state_dict().values()})
    with safe_open(path, "pt") as f:  # after the measurement: spot-check values against the file
        same = all(torch.equal(model.state_dict()[k], f.get_tensor(k).float()) for k in
                   ["model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.weight",
                    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"])
    print(json.dumps(dict(base_kib=base, peak_kib=peak, state_bytes=params, seconds=seconds, dtypes=dtypes,
                          same=same)))
""")


def test_fp16_file_loads_as_fp32_within_one_fp32_copy_plus_the_file(sd15_file):
    with fullsize_lock():
        out = subprocess.run([sys.executable, "-c", MEASURE, str(sd15_file)], capture_output=True, text=True,
                             timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    file_bytes = sd15_file.stat().st_size
    peak, base = r["peak_kib"] * 1024, r["base_kib"] * 1024
    print(f"\nfull-size fp16 -> fp32 load: peak RSS {peak / 2**30:.2f} GiB (interpreter + torch before loading "
          f"{base / 2**30:.2f} GiB); fp32 weights {r['state_bytes'] / 2**30:.2f} GiB; "
          f"file {file_bytes / 2**30:.2f} GiB; {r['seconds']:.1f} s")
    assert r["same"] and r["dtypes"] == ["torch.float32", "torch.int64"]
    assert r["state_bytes"] > 4.2e9  # it really was the full-size model, in fp32
    assert peak - base < 1.3 * r["state_bytes"] + file_bytes
