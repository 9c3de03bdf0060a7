"""Chapter 10, first part: generated scenes, the ViT on the shared blocks, CLIP and its data-parallel loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from course.exercises import lesson10
from course.model import attention_maps
from course.parallel import launch
from course.parallelize import Plan, parallelize
from course.train import TrainConfig, train
from course.vision import clip as C
from course.vision import data as D
from course.vision import vit as V

# float64 (eps 1.1e-16): the compared computations differ only in how batched matmuls and sums are
# blocked, each rounding by ~eps relative; 1e-12 leaves 10^4 for the depth of the models.
TOL = 1e-12


# ----------------------------------------------------------------------------- data

def test_scenes_are_deterministic_and_masks_exact():
    a, b = D.make_scenes(12, seed=3, noise=0.0), D.make_scenes(12, seed=3, noise=0.0)
    assert all(torch.equal(x.image, y.image) and torch.equal(x.masks, y.masks) for x, y in zip(a, b))
    assert not torch.equal(a[0].image, D.make_scenes(1, seed=4)[0].image)
    nested = 0
    for s in a:
        K = len(s.shapes)
        assert s.image.shape == (3, 32, 32) and s.masks.shape == (K, 32, 32) and s.parent.shape == (K,)
        vis = s.visible
        for k in range(K):  # every visible pixel shows exactly the object's colour (noise=0)
            colour = torch.tensor(D.COLOURS[s.colours[k]])[:, None]
            assert torch.equal(s.image[:, vis[k]], colour.expand(3, int(vis[k].sum())))
            x0, y0, x1, y1 = s.boxes[k].long().tolist()
            assert s.masks[k].sum() == s.masks[k, y0:y1, x0:x1].sum()  # the box holds the whole mask
            p = int(s.parent[k])
            if p >= 0:  # nested: inside its parent, so a click on it is ambiguous (it, or the whole)
                nested += 1
                assert not (s.masks[k] & ~s.masks[p]).any() and vis[p].any()
        background = ~s.masks.any(0)
        assert torch.equal(s.image[:, background], torch.zeros(3, int(background.sum())))
        top = [k for k in range(K) if s.parent[k] < 0]  # top-level objects do not overlap
        assert all(not (s.masks[i] & s.masks[j]).any() for i in top for j in top if i < j)
    assert nested > 0


def test_captions_and_held_out_pairs():
    s = D.make_scenes(40, seed=0)
    assert all((c, sh) in D.TRAIN_PAIRS for x in s for c, sh in zip(x.colours, x.shapes))
    assert {c for c, _ in D.HELD_OUT} <= {c for c, _ in D.TRAIN_PAIRS}  # each colour and shape still seen
    assert {sh for _, sh in D.HELD_OUT} == set(D.SHAPES)
    d = D.caption_data(30, seed=1, split="heldout", nest_prob=0.0)
    assert all((x.colours[0], x.shapes[0]) in D.HELD_OUT for x in d.scenes)
    assert [D.PAIRS[i] for i in d.labels] == [(x.colours[0], x.shapes[0]) for x in d.scenes]
    scene = next(x for x in D.caption_data(30, seed=2).scenes if len(x.shapes) == 2)
    assert scene.caption == f"a {scene.colours[1]} {scene.shapes[1]} inside a {scene.colours[0]} {scene.shapes[0]}"
    tok = D.WordTokenizer()
    ids = tok.encode(["a red circle", scene.caption])
    assert ids.shape == (2, 8) and ids[0, 3] == 1 and ids[0, 4:].eq(0).all() and ids[1, -1] == 1
    assert tok.decode(ids) == ["a red circle", scene.caption]


# ----------------------------------------------------------------------------- ViT

def test_patchify_and_patch_embedding_match_pytorch():
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    assert torch.equal(V.patchify(x, 4), F.unfold(x, 4, stride=4).transpose(1, 2))
    assert torch.equal(V.patchify(x, 4), lesson10._patchify(x, 4))
    vit = V.ViT(V.ViTConfig(image_size=16, patch_size=4)).double()
    lin = vit.patch_embed  # a linear map of flattened patches is a stride-P convolution (section 3.1)
    conv = F.conv2d(x[..., :16], lin.weight.view(-1, 3, 4, 4), lin.bias, stride=4)  # (B, D, 4, 4)
    torch.testing.assert_close(lin(V.patchify(x[..., :16], 4)), conv.flatten(2).transpose(1, 2), rtol=0, atol=TOL)


def test_sincos_positions():
    pe = V.sincos_2d(3, 5, 8).double()  # (15, 8): dims 0-3 encode the column, 4-7 the row
    for n in range(15):
        r, c = divmod(n, 5)
        want = [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
                math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]
        torch.testing.assert_close(pe[n], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)  # float32 table
    assert V.ViT(V.ViTConfig()).state_dict().keys().isdisjoint({"pos_embed"})  # fixed: not a weight


def test_vit_shapes_windows_attention_maps_and_recompute():
    cfg = V.ViTConfig(image_size=32, patch_size=8, n_layer=3, window=2, global_blocks=(2,), n_classes=5)
    vit = V.ViT(cfg)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, loss = vit(x, y)
    assert logits.shape == (4, 5) and loss.shape == ()
    assert vit.features(x).shape == (4, 16, 64) and vit.feature_map(x).shape == (4, 64, 4, 4)
    assert vit.windowed() == [True, True, False]
    maps = attention_maps(vit, x)  # (L, B, H, N, N): course.model's helper works through the shared blocks
    assert maps.shape == (3, 4, 4, 16, 16)
    outside = ~V.window_mask(4, 4, 2)
    assert maps[:2][..., outside].abs().max() == 0 and maps[2].min() > 0  # windowed vs global
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 4, 4, 16))
    grads = torch.autograd.grad(vit(x, y)[1], list(vit.parameters()))
    parallelize(vit, Plan(recompute="full"))  # the course's techniques apply to the ViT unchanged
    again = torch.autograd.grad(vit(x, y)[1], list(vit.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


def test_vit_bad_inputs():
    with pytest.raises(ValueError, match="not divisible by ViTConfig.patch_size"):
        V.ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        V.patchify(torch.zeros(1, 3, 30, 32), 8)
    with pytest.raises(ValueError, match="does not tile"):
        V.ViTConfig(image_size=48, patch_size=8, window=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        V.ViTConfig(n_embd=66, n_head=6)
    with pytest.raises(ValueError, match="global_blocks"):
        V.ViTConfig(window=2, global_blocks=(5,))
    vit = V.ViT(V.ViTConfig())
    with pytest.raises(ValueError, match="image_size=32"):
        vit(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="in_chans=3"):
        vit(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="batch dimension"):
        vit(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="split"):
        D.make_scenes(2, split="test")
    with pytest.raises(ValueError, match="size"):
        D.make_scenes(2, size=8)
    with pytest.raises(ValueError, match="radius"):
        D.caption_data(2, radius=(0.3, 0.6))


# ----------------------------------------------------------------------------- CLIP

def test_contrastive_loss_equals_its_definition_by_hand():
    s = 10.0
    img = torch.tensor([[2.0, 0.0], [3.0, 3.0]], dtype=torch.float64)  # unit vectors (1, 0) and (1, 1)/√2
    txt = torch.tensor([[1.0, 0.0], [0.0, 5.0]], dtype=torch.float64)  # (1, 0) and (0, 1)
    r = 1 / math.sqrt(2)  # cosines: [[1, 0], [r, r]]
    rows = [math.log(1 + math.exp(-s)), math.log(2)]  # image i vs both texts, target i
    cols = [math.log(1 + math.exp(s * (r - 1))), math.log(1 + math.exp(-s * r))]  # text j vs both images
    want = (sum(rows) / 2 + sum(cols) / 2) / 2
    assert abs(C.contrastive_loss(img, txt, s).item() - want) < TOL
    assert abs(lesson10._clip_loss(img, txt, 1 / s).item() - want) < TOL  # the exercise's reference


def test_clip_shapes_temperature_and_zero_shot_api():
    model = C.CLIP()
    d = D.caption_data(6, seed=0)
    tokens = D.WordTokenizer().encode(d.captions, 8)
    logits, loss = model(d.images, tokens)
    assert logits.shape == (6, 6) and loss.shape == ()
    assert model.encode_image(d.images).shape == (6, 32) and model.encode_text(tokens).shape == (6, 32)
    assert abs(model.logit_scale.item() - 1 / 0.07) < 1e-5  # section 2.5
    with torch.no_grad():
        model.log_scale.fill_(math.log(500.0))
    assert model.logit_scale.item() == 100.0  # clamped
    model(d.images, tokens)[1].backward()
    assert model.log_scale.grad == 0  # no gradient pushes it further while clamped
    assert C.zero_shot(model, d.images).shape == (6,)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        C.contrastive_loss(torch.ones(1, 4), torch.ones(1, 4), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        C.contrastive_loss(torch.ones(3, 4), torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError, match="one caption per image"):
        model(d.images, tokens[:3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        D.WordTokenizer().encode(["a purple circle"])
    with pytest.raises(ValueError, match="empty caption"):
        model.encode_text(torch.zeros(2, 8, dtype=torch.long))


def test_data_parallel_loss_equals_single_process():
    """2 gloo ranks, 4 pairs each: embeddings all-gathered, each rank's loss over the global batch of 8."""
    cfg = C.CLIPConfig(vit=V.ViTConfig(n_layer=1, n_embd=32), text_layers=1, text_width=32, embed_dim=16)
    loss, grads = C.single_loss_and_grads(cfg, 0, 8)
    for rank_loss, rank_grads in launch.run(C.dp_loss_and_grads, 2, cfg, 0, 8, timeout=180, threads=1).values:
        assert abs(rank_loss - loss) < TOL * abs(loss)
        for name, g in grads.items():  # DataParallel's average of the ranks' gradients = one process's
            assert (rank_grads[name] - g).abs().max() <= TOL * max(g.abs().max(), 1e-30), name


def test_short_training_beats_chance_zero_shot():
    """200 steps (fixed seeds) of the one loop on generated pairs. Chance: 1/20 for the 20 colour-shape
    prompts, 1/5 for the colour. Margins: 3x chance on the pairs seen in training, 4x chance for the colour
    of HELD-OUT pairs (each held-out colour was seen with three other shapes, so its word transfers). The
    held-out pairs' shape is not asserted: this small a model mostly memorises which shapes each colour
    came with, and the lesson measures that gap."""
    torch.manual_seed(0)
    model = C.CLIP()
    batches = C.CaptionBatches(n_train=1000, n_val=64, batch_size=64, seed=0)
    hist = train(model, batches, TrainConfig(max_steps=200, lr=3e-3, warmup_steps=20, eval_interval=200,
                                             eval_iters=1, progress=False))
    assert hist.train_loss[-1] < hist.train_loss[0]
    seen = D.caption_data(100, seed=5, split="train", nest_prob=0.0)
    held = D.caption_data(100, seed=6, split="heldout", nest_prob=0.0)
    assert C.zero_shot_accuracy(model, seen.images, seen.labels) >= 3 / 20
    colours = [D.PAIRS[i][0] for i in C.zero_shot(model, held.images).tolist()]
    assert sum(c == D.PAIRS[y][0] for c, y in zip(colours, held.labels.tolist())) / 100 >= 4 / 5
