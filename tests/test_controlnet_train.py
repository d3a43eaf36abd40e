"""The tiny ControlNet trainer (sd_core/train_controlnet.py): reproducible from the seed, learns from the start
(zero convolutions open up), and its control images are the scenes' silhouettes."""
from types import SimpleNamespace

import numpy as np
import torch

from glass_diffusion.sd_core import builtin, toy_data
from glass_diffusion.sd_core import train_controlnet as T


def _args(seed):
    return SimpleNamespace(seed=seed, resolution=64, pool=16, steps=3, batch=4, lr=1e-3)


def test_training_is_reproducible_by_seed_and_moves_the_zero_convs():
    torch.set_num_threads(1)
    model, tok = builtin.load(dtype=torch.float32)
    a, b, c = (T.train(model, tok, _args(s)) for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert sa["zero_convs.0.0.weight"].abs().max() > 0  # no longer zero: the ControlNet acts after training
    assert not any(p.requires_grad for p in model.parameters())  # the base model stayed frozen


def test_silhouette_is_the_scene_shape():
    _, _, scenes = toy_data.make_batch(5, 4)
    sil = T.control_images(scenes)
    assert sil.shape == (4, 64, 64, 3) and 0 <= sil.min() and sil.max() <= 1
    for s, img in zip(scenes, sil[..., 0].numpy()):
        cx, cy = toy_data.shape_centre(s)
        assert img[int(cy), int(cx)] > 0.9 or s.shape == "triangle"  # the centre is inside (triangles: mostly)
        ys, xs = np.nonzero(img > 0.5)
        assert abs(xs.mean() - cx) < 4 and abs(ys.mean() - cy) < 6
    rng = np.random.default_rng(0)
    caps = [T.training_caption(scenes[0], rng) for _ in range(200)]
    said = [toy_data.parse_prompt(c) for c in caps]
    positions = {(d["row"], d["col"]) for d in said if d["row"] is not None}
    assert len(positions) >= 5  # the prompt's position is often not the silhouette's
    assert 0.05 < np.mean([d["row"] is None for d in said]) < 0.3
