"""The SD 1.5 module tree has exactly the single-file checkpoint's keys and shapes (built on meta: no memory)."""
from pathlib import Path

import pytest
import torch

from glass_diffusion.sd_core.model import SDConfig, StableDiffusion
from glass_diffusion.sd_core.family import SD1, SD1_INPAINT, family_of_config

TSV = Path(__file__).parent / "data" / "sd15_checkpoint_keys.tsv"
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"}


def read_tsv():
    rows = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows[key] = (tuple(int(s) for s in shape.strip("[]").split(",") if s), dtype)
    return rows


@pytest.fixture(scope="module")
def meta_sd15():
    with torch.device("meta"):
        return StableDiffusion(SDConfig.sd15(), SD1)


def test_tsv_is_the_full_layout():
    rows = read_tsv()
    assert len(rows) == 1143
    assert SCHEDULE_BUFFERS <= set(rows)


def test_sd15_state_dict_keys_and_shapes_match_checkpoint(meta_sd15):
    rows = read_tsv()
    expected = {k: v[0] for k, v in rows.items() if k not in SCHEDULE_BUFFERS}
    ours = {k: tuple(v.shape) for k, v in meta_sd15.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [], "keys in the checkpoint that the model lacks"
    assert sorted(set(ours) - set(expected)) == [], "keys in the model that the checkpoint lacks"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert wrong == {}


def test_sd15_parameter_counts(meta_sd15):
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(meta_sd15.unet) == 859_520_964
    assert count(meta_sd15.vae) == 83_653_863
    assert count(meta_sd15.clip) == 123_060_480


def test_inpainting_unet_takes_nine_channels():
    with torch.device("meta"):
        m = StableDiffusion(SDConfig.sd15(inpainting=True), SD1_INPAINT)
    assert tuple(m.state_dict()["model.diffusion_model.input_blocks.0.0.weight"].shape) == (320, 9, 3, 3)


def test_position_ids_is_a_persistent_int64_buffer(meta_sd15):
    ids = meta_sd15.state_dict()["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (1, 77)


def test_meta_build_then_assign_load_round_trips():
    """The checkpoint loader's path: build on meta, load_state_dict(assign=True), run."""
    cfg = SDConfig.tiny()
    torch.manual_seed(0)
    real = StableDiffusion(cfg, family_of_config(cfg)).eval()
    sd = {k: v.clone() for k, v in real.state_dict().items()}
    with torch.device("meta"):
        lazy = StableDiffusion(cfg, family_of_config(cfg))
    lazy.load_state_dict(sd, assign=True)
    lazy.eval()
    assert not any(t.is_meta for t in list(lazy.parameters()) + list(lazy.buffers()))
    assert torch.equal(lazy.clip.text_model.embeddings.position_ids, torch.arange(77)[None])
    ids = torch.randint(0, 998, (1, 77))
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(lazy.clip(ids).z, real.clip(ids).z)
        assert torch.equal(lazy.unet(x, t, ctx), real.unet(x, t, ctx))


def test_config_dict_round_trip():
    import json
    for cfg in (SDConfig.sd15(), SDConfig.tiny(), SDConfig.sd15(inpainting=True)):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert SDConfig.from_dict(d) == cfg
    with pytest.raises(ValueError):
        SDConfig.from_dict({"unet": {"no_such_field": 1}})
