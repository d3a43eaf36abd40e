"""The script-level helpers (txt2img / img2img / inpaint) on a tiny StableDiffusion: shapes, determinism, and
that each is exactly the composition of the public pieces (encode_prompt -> sample -> VAE decode)."""
import pytest
import torch

from _text_util import SMALL_BPE
from glass_diffusion.sd_core.clip import CLIPTextConfig
from glass_diffusion.sd_core.conditioning import encode_prompt
from glass_diffusion.sd_core.model import SDConfig, StableDiffusion
from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.family import SD1, SD1_INPAINT
from glass_diffusion.sd_core.sampling import SampleRequest, img2img, inpaint, sample, txt2img
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer
from glass_diffusion.sd_core.unet import UNetConfig
from glass_diffusion.sd_core.vae import VAEConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer(SMALL_BPE)


def tiny_model(tok, inpainting=False):
    torch.manual_seed(0)
    clip = CLIPTextConfig.tiny(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    cfg = SDConfig(UNetConfig.tiny(in_channels=9 if inpainting else 4), clip, VAEConfig.tiny())
    return StableDiffusion(cfg, SD1_INPAINT if inpainting else SD1).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


KW = dict(steps=3, cfg=5.0, sampler_name="euler_ancestral", scheduler="karras")


def sample_kw(model, pos, neg, latent, **request):
    return sample(DiffusionModel.from_checkpoint(model), pos, neg, latent, SampleRequest(**request))


def test_txt2img_is_the_pieces(model, tok):
    img = txt2img(model, tok, "a red fox", "blurry", width=64, height=64, seed=4, **KW)
    assert img.shape == (1, 64, 64, 3) and img.min() >= 0 and img.max() <= 1
    assert torch.equal(img, txt2img(model, tok, "a red fox", "blurry", width=64, height=64, seed=4, **KW))
    assert not torch.equal(img, txt2img(model, tok, "a red fox", "blurry", width=64, height=64, seed=5, **KW))
    # by hand from the public pieces
    pos, neg = encode_prompt(model.clip, tok, "a red fox"), encode_prompt(model.clip, tok, "blurry")
    lat = sample_kw(model, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, seed=4, **KW)
    with torch.no_grad():
        ref = ((model.vae.decode(lat["samples"]) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.equal(img, ref)


def test_img2img_and_inpaint(model, tok):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 64, 64, 3, generator=g)
    out = img2img(model, tok, image, "a cat", denoise=0.5, seed=2, **KW)
    assert out.shape == image.shape
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    painted = inpaint(model, tok, image, mask, "a cat", seed=2, **KW)
    assert painted.shape == image.shape and torch.isfinite(painted).all()
    # by hand: encode (distribution mode), sample at the denoise (with the mask as noise_mask), decode
    pos, neg = encode_prompt(model.clip, tok, "a cat"), encode_prompt(model.clip, tok, "")
    with torch.no_grad():
        z = model.vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).mode()

    def decode(lat):
        with torch.no_grad():
            return ((model.vae.decode(lat["samples"]) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    ref = decode(sample_kw(model, pos, neg, {"samples": z}, seed=2, denoise=0.5, **KW))
    assert torch.equal(out, ref)
    ref = decode(sample_kw(model, pos, neg, {"samples": z, "noise_mask": mask}, seed=2, **KW))
    assert torch.equal(painted, ref)
    assert not torch.equal(painted, decode(sample_kw(model, pos, neg, {"samples": z}, seed=2, **KW)))


def test_inpaint_with_nine_channel_model(tok):
    model = tiny_model(tok, inpainting=True)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(64, 64)
    mask[8:40, 8:40] = 1
    out = inpaint(model, tok, image, mask, "a dog", seed=3, **KW)
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()
