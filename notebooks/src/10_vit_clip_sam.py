# %% [markdown]
# # 10 · ViT, CLIP and a small promptable segmenter, trained from scratch on a CPU
#
# The same transformer blocks that read text in every earlier chapter read images here. Three models, each
# rebuilt small enough to train in a minute, with no download:
#
# * **ViT** (Dosovitskiy et al. 2021, §3.1): cut an image into patches, project each patch to a vector,
#   add positions, and run the transformer encoder over the sequence of patches.
# * **CLIP** (Radford et al. 2021): an image encoder and a text encoder trained so that an image and its
#   caption land close together; then any caption becomes a classifier, with no training on its class
#   (**zero-shot**).
# * **SAM** (Kirillov et al. 2023): a ViT image encoder, a prompt encoder for clicks, boxes and masks, and a
#   light decoder that returns three masks for an ambiguous click (second part of the lesson).
#
# Data: generated scenes of coloured shapes with exact masks and captions (`course.vision.data`); some
# shapes are nested inside others, so a click on the inner one could mean it or the whole object.
# The library is `course/vision/` (`data.py`, `vit.py`, `clip.py`, `sam.py`); figures come from
# `course/lessons/vision.py`.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

from course.device import profile
from course.lessons import vision as L
from course.model import attention_maps
from course.parallel import launch
from course.parallelize import Plan, parallelize
from course.train import TrainConfig, train
from course.vision import clip as C
from course.vision import data as D
from course.vision import vit as V

prof = profile()
torch.manual_seed(0)
print(prof.name, "profile")

# %% [markdown]
# ## 1. Scenes with exact masks and captions
#
# Every scene comes from a seed: a few objects, each a shape (circle, square, triangle, diamond) in one of
# five colours, drawn on black. Half of the objects hold a smaller object of another colour. The masks are
# the shapes' exact pixel sets (an outer object's mask includes its inner one), and the caption is
# generated from the same objects, inner first: "a red circle inside a blue square".

# %%
# NBVAL_CHECK_OUTPUT
scenes = D.make_scenes(6, seed=0, size=32)
for s in scenes[:3]:
    print(f"{s.caption!r}: {len(s.shapes)} objects, parents {s.parent.tolist()}, "
          f"mask pixels {s.masks.sum((1, 2)).tolist()}")
fig = L.show_scenes(scenes)

# %% [markdown]
# In the bottom row each object has its own shade; nested objects are outlined in white. For CLIP, four of
# the twenty colour–shape pairs never appear in training, one per shape and each with another colour, so
# every colour and every shape is still seen, only not together:

# %%
# NBVAL_CHECK_OUTPUT
print("held out of training:", ", ".join(f"{c} {s}" for c, s in D.HELD_OUT))
print(f"{len(D.TRAIN_PAIRS)} pairs in training, {len(D.PAIRS)} prompts at test time")

# %% [markdown]
# ## 2. An image is a sequence of patches
#
# ViT (§3.1) reshapes an image (C, H, W) into N = HW/P² patches, each flattened to C·P² numbers, and maps each
# with one learned matrix E to the model width D. `patchify` is written out with `reshape` and `permute`;
# PyTorch's `F.unfold` does the same cut, and a linear map of flattened patches is a convolution with
# kernel P and stride P (how most code writes it):

# %%
# NBVAL_CHECK_OUTPUT
image = scenes[2].image  # (3, 32, 32)
P = 8
tokens = V.patchify(image[None], P)[0]  # (N, C·P·P) = (16, 192)
assert torch.equal(tokens, F.unfold(image[None], P, stride=P)[0].T)
vit = V.ViT(V.ViTConfig(image_size=32, patch_size=P))
E = vit.patch_embed
conv = F.conv2d(image[None], E.weight.view(-1, 3, P, P), E.bias, stride=P)  # (1, D, 4, 4)
torch.testing.assert_close(E(tokens), conv[0].flatten(1).T, rtol=1e-5, atol=1e-6)  # float32: order of sums
print(f"{tuple(image.shape)} -> {tuple(tokens.shape)} patches -> {tuple(E(tokens).shape)} embeddings")
fig = L.plot_patches(image, P, tokens)

# %% [markdown]
# Sizes are checked: an image whose side is not a multiple of the patch size is refused, not cropped.

# %%
try:
    V.ViTConfig(image_size=30, patch_size=8)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## 3. Positions in two dimensions
#
# A transformer cannot tell patches apart by position unless it is told. ViT learns one vector per position
# (§3.1, and finds 2-D-aware variants no better, appendix D.4); MoCo v3 (Chen, Xie & He 2021) and MAE (He
# et al. 2022) use **fixed 2-D sin-cos** embeddings instead: half the channels are sines and cosines of the
# patch column at geometric frequencies, half of the row. Patches in the same row or column share half
# their code, so the cosine with a reference patch falls off along both axes:

# %%
pe = V.sincos_2d(8, 8, 64)  # an 8×8 grid (patch 4 on 32×32 images), width 64
fig = L.plot_positions(pe, 8)

# %% [markdown]
# ## 4. The encoder is the course's shared blocks
#
# `ViT` runs `course.model.Block`s through the model's `runner` seam, without a causal mask. So everything
# the earlier chapters plug into the blocks works unchanged: here recomputation (chapter 04) gives the same
# gradients. SAM's encoder mixes **windowed** blocks, which attend only inside w×w windows of the patch
# grid, with a few global ones (ViTDet, Li et al. 2022; SAM appendix A: 14×14 windows, four global
# blocks). A windowed block is the same Block with a fixed mask:

# %%
# NBVAL_CHECK_OUTPUT
cfg = V.ViTConfig(image_size=32, patch_size=4, n_layer=3, window=4, global_blocks=(2,), n_classes=4)
vit = V.ViT(cfg)
x, y = D.stack_images(scenes), torch.tensor([0, 1, 2, 3, 0, 1])
plain = torch.autograd.grad(vit(x, y)[1], list(vit.parameters()))
parallelize(vit, Plan(recompute="full"))  # chapter 04's technique, applied from outside
recomputed = torch.autograd.grad(vit(x, y)[1], list(vit.parameters()))
assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
mask = V.window_mask(8, 8, 4)
print(f"windowed blocks {vit.windowed()}; a windowed block lets each patch see {int(mask[0].sum())} "
      f"of {mask.size(0)} patches")

# %% [markdown]
# ## 5. CLIP: pull each image towards its caption
#
# Radford et al. 2021 (figure 3): embed a batch of N images and their N captions, L2-normalise, and form the
# N × N matrix of cosines times a learned scale 1/τ. Each row is a classification of one image among all N
# captions and each column of one caption among all N images; the loss averages the two cross-entropies,
# with the matching pair on the diagonal as the answer. τ is learned, initialised at 0.07 and clamped so the
# scale never exceeds 100 (§2.5). The text encoder is the course's causal Transformer read at the caption's
# `[EOS]` token, as CLIP's (§2.5); the image encoder is the ViT above, with global blocks.

# %%
# NBVAL_CHECK_OUTPUT
steps = 600 if prof.name == "cpu" else 3000
clip_cfg = C.CLIPConfig(vit=V.ViTConfig(image_size=32, patch_size=4, n_layer=2, n_embd=64))
torch.manual_seed(0)
model = C.CLIP(clip_cfg)
batches = C.CaptionBatches(n_train=2000, n_val=256, batch_size=64, seed=0)
tok = D.WordTokenizer()
show = D.caption_data(8, seed=11, nest_prob=0.5)  # 8 pairs to look at
show_tokens = tok.encode(show.captions, clip_cfg.context)
seen = D.caption_data(200, seed=12, split="train", nest_prob=0.0)  # test images of pairs seen in training
held = D.caption_data(200, seed=13, split="heldout", nest_prob=0.0)  # ... and of the held-out pairs
sim_before, zs_before = C.similarity(model, show.images, show_tokens), L.zero_shot_report(model, seen, held)
print(f"CLIP: {model.num_params():,} parameters, logit scale {model.logit_scale.item():.2f} = 1/0.07")

# %% [markdown]
# Training is the course's one loop, `course.train.train`: the CLIP model returns (logits, loss) like the
# language models do, and `CaptionBatches` is the `batch_fn`.

# %%
# NBVAL_IGNORE_OUTPUT
t0 = time.perf_counter()
hist = train(model, batches, TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=30, eval_interval=100,
                                         eval_iters=2, progress=True), label="CLIP")
clip_s = time.perf_counter() - t0
ax = hist.plot()
ax.axhline(C.contrastive_loss(torch.eye(64), torch.eye(64), 0.0).item(), color="gray", ls=":",
           label="uniform guess: ln 64")
ax.set_ylabel("contrastive loss (nats)"), ax.legend()
print(f"{steps} steps in {clip_s:.0f} s; logit scale now {model.logit_scale.item():.1f}")

# %%
sim_after = C.similarity(model, show.images, show_tokens)
fig = L.plot_similarity(sim_before, sim_after, show.captions)
diag = (sim_after.argmax(1) == torch.arange(8)).float().mean().item()

# %% [markdown]
# Before training the cosines are nearly the same everywhere; after it, each image's largest cosine is
# mostly on its own caption (the diagonal). Captions that say the same thing ("a red circle" twice) get the
# same column, so their images cannot be told apart by the loss either: CLIP treats them as negatives all
# the same.

# %%
display(Markdown(f"After training, {diag:.0%} of these 8 images have their largest cosine on their own caption."))

# %% [markdown]
# ## 6. Zero-shot classification on held-out colour–shape pairs
#
# Zero-shot (§3.1.2): write one prompt per class, "a {colour} {shape}" for the 20 pairs, embed them with the
# text encoder, and give each test image the class of the closest prompt. Test images hold one object, of a
# pair seen in training or of one of the four held out of it.

# %%
zs_after = L.zero_shot_report(model, seen, held)
fig = L.plot_zero_shot(zs_before, zs_after)
assert zs_after["seen pairs"] > 4 * zs_after["chance (20 prompts)"]
assert zs_after["held-out colour"] > 3 * zs_after["chance (colour)"]

# %%
z = zs_after
display(Markdown(
    f"Out of 20 prompts (chance {z['chance (20 prompts)']:.0%}): {z['seen pairs']:.0%} right on seen pairs, "
    f"{z['held-out pairs']:.0%} on held-out ones. On held-out pairs the colour is right {z['held-out colour']:.0%} "
    f"of the time (chance {z['chance (colour)']:.0%}), the shape {z['held-out shape']:.0%} (chance "
    f"{z['chance (shape)']:.0%}, {z['seen shape']:.0%} on seen pairs). Among only the four held-out prompts "
    f"it scores {z['held-out, among the 4 held-out prompts']:.0%}, but each of those has its own colour, so "
    f"colour alone would do."))

# %% [markdown]
# What the numbers say. The colour word transfers to shapes it was never paired with; the shape mostly does
# not: on a held-out pair the model tends to answer with a shape it saw in that colour, so it learned pairs
# more than it learned to compose colour and shape. The real CLIP, trained on 400M pairs, does compose an
# attribute and an object for single objects in generated scenes of this kind, and fails only when two
# objects must be bound to their attributes (Lewis et al. 2024, "Does CLIP bind concepts?"); 2,000 tiny
# images of 16 pairs are far from that. ViT also has little built-in knowledge of images (no convolutions,
# §3.1 "Inductive bias"), which is why it needs large data to do well (§4.3).
#
# ## 7. Where the trained ViT looks
#
# `course.model.attention_maps` swaps every attention core for one that keeps its weights, the same tool
# as in chapter 01. From the patch marked on the left, each layer's attention (mean over heads):

# %%
img = show.images[1]
maps = attention_maps(model.image, img[None])[:, 0]  # (L, H, N, N)
cy, cx = show.scenes[1].masks[0].nonzero().float().mean(0).tolist()  # the object's centre (row, column)
query = int(cy // 4) * 8 + int(cx // 4)  # the patch that holds it
fig = L.plot_attention_on_image(img, maps, query, 8)

# %% [markdown]
# The same weights in a windowed encoder (the window mask is a buffer, not a weight, so the state dict
# loads unchanged): its first block cannot look outside its 4×4-patch window, its global block can.

# %%
windowed = V.ViT(clip_cfg.vit.replace(window=4, global_blocks=(1,)))
windowed.load_state_dict(model.image.state_dict())
wmaps = attention_maps(windowed, img[None])[:, 0]
assert wmaps[0][:, ~V.window_mask(8, 8, 4)].abs().max() == 0 and wmaps[1].min() > 0
fig = L.plot_attention_on_image(img, wmaps, query, 8, windowed=windowed.windowed())

# %% [markdown]
# ## 8. The contrastive loss across data-parallel ranks
#
# The negatives are the other pairs of the batch, so with data parallelism each rank must see every rank's
# embeddings: each all-gathers them, puts its own (the only ones with gradients) in its slot and computes
# the loss over the global batch (CLIP's batch was 32,768 pairs, §2.5).
# All-gather's backward would sum each slot's gradient over ranks; since every rank computes the same loss
# from the same tensor, that sum is world × the local gradient, so `gather_embeddings` needs no
# communication in backward. Checked on 2 gloo ranks in float64: loss and averaged gradients equal one
# process's on the whole batch.

# %%
# NBVAL_CHECK_OUTPUT
small = C.CLIPConfig(vit=V.ViTConfig(n_layer=1, n_embd=32), text_layers=1, text_width=32, embed_dim=16)
loss1, grads1 = C.single_loss_and_grads(small, 0, 8)
ranks = launch.run(C.dp_loss_and_grads, 2, small, 0, 8, timeout=240, threads=1).values
gap_loss = max(abs(l - loss1) for l, _ in ranks)
gap_grad = max((g[n] - grads1[n]).abs().max().item() for _, g in ranks for n in grads1)
assert gap_loss < 1e-12 * loss1 and gap_grad < 1e-12  # float64: only the blocking of sums differs
print("2 ranks x 4 pairs == 1 process x 8 pairs: loss and every gradient agree to 1e-12")

# %% [markdown]
# ## 9. How the real models differ
#
# | | here | the real one |
# |---|---|---|
# | ViT | 32×32 images, 4×4 patches, 2 blocks of width 64 | ViT-B/16: 224×224, 16×16 patches, 12 blocks of width 768, 86M parameters (Dosovitskiy et al. 2021, Table 1) |
# | CLIP data | 2,000 generated images, 4 words a caption | 400M (image, text) pairs from the internet (Radford et al. 2021, §2.2) |
# | CLIP model | two 2-block encoders | ViT-L/14 trained for 12 days on 256 V100s (the largest ResNet: 18 days on 592), then one more epoch at 336 px (§2.5) |
# | SAM encoder | (second part) | ViT-H, 632M parameters, 1024×1024 input → 64×64 embedding (Kirillov et al. 2023, §3 and appendix A) |
# | SAM data | generated scenes | SA-1B: 1.1B masks on 11M images (§5) |
# | MobileSAM | (second part: distillation) | a TinyViT encoder of about 5M parameters (5.78M) distilled from SAM's ViT-H (Zhang et al. 2023, "Faster Segment Anything") |
#
# Honest limits of this part: the scenes are clean synthetic shapes with five pure colours; the captions come
# from a closed vocabulary of 14 words, so the text encoder learns word identities, not language; and the
# zero-shot test asks only for colour–shape composition, which section 6 shows is already hard.

# %% [markdown]
# <!-- sam section -->
