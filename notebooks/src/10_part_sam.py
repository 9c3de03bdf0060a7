# %% [markdown]
# ## A promptable segmenter in the spirit of SAM
#
# The Segment Anything Model (Kirillov et al. 2023, section 3) cuts out whatever object a **prompt**
# points at: a click, a box, a rough mask or a text. It has three parts:
# 1. an **image encoder**, a ViT run once per image, giving an image embedding on the patch grid;
# 2. a **prompt encoder**: points and boxes become tokens (random Fourier features of the position,
#    Tancik et al. 2020, plus a learned embedding saying "foreground click", "background click",
#    "top-left corner", "bottom-right corner"); a mask goes through two strided convolutions and is added
#    to the image embedding; a text goes through CLIP's text encoder;
# 3. a light **mask decoder**: a two-way transformer where the prompt tokens and three output tokens
#    attend to the image and the image attends back; each output token becomes one mask, and an IoU
#    head predicts how good each mask is. Three masks, because one click is ambiguous: on a shape
#    nested in another, does it mean the inner shape or the whole object?
#
# Here the encoder is this chapter's ViT, the images are the generated scenes with nested shapes, and
# all of it trains in about a minute on a laptop CPU, through the course's one training loop.

# %%
import time

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from course.lessons import sam as LS
from course.vision import data as vdata
from course.vision import sam_train as ST
from course.vision.sam import SAM, SAMConfig

sizes = LS.Sizes()  # on the CPU whatever the machine has: scenes, clicks and model are small
print(sizes)

# %% [markdown]
# ### The prompt encoder
#
# A point (x, y) in pixels is scaled to [0, 1]², mapped to [-1, 1]², projected by a fixed random
# Gaussian matrix B (2 × C/2) and encoded as [sin 2πBv, cos 2πBv]. Nearby points get similar codes,
# far ones nearly unrelated codes: the similarity of one point's code with every pixel's shows it.
# The prompt tokens form a **set**: permuting the clicks permutes the tokens and leaves the masks
# unchanged (the decoder has no notion of token order), which the cell checks.

# %%
torch.manual_seed(0)
probe = SAM(SAMConfig(**sizes.teacher))
S = probe.cfg.image_size
xy = torch.stack(torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="xy"), -1)  # (S, S, 2)
codes = probe.prompt_encoder.pe(xy / S)  # (S, S, C)
sim = torch.cosine_similarity(codes, codes[8, 20][None, None], dim=-1)
pts, lab = torch.tensor([[[20.5, 8.5], [5.5, 25.5]]]), torch.tensor([[1, 0]])
sparse, dense = probe.prompt_encoder(points=pts, labels=lab, boxes=torch.tensor([[2.0, 3, 14, 15]]))
sparse_swapped, _ = probe.prompt_encoder(points=pts[:, [1, 0]], labels=lab[:, [1, 0]], boxes=torch.tensor([[2.0, 3, 14, 15]]))
assert torch.equal(sparse_swapped[:, [1, 0, 2, 3]], sparse)  # a set of tokens: order carries nothing
print("tokens for 2 clicks + 1 box:", tuple(sparse.shape), " dense (no mask):", tuple(dense.shape))
fig, ax = plt.subplots(figsize=(3.4, 3))
im = ax.imshow(sim.detach(), cmap="coolwarm", vmin=-1, vmax=1)
ax.plot(20, 8, "k*"), ax.set_xlabel("x (pixels)"), ax.set_ylabel("y (pixels)")
fig.colorbar(im, label="cosine with the code of the star"), ax.set_title("Fourier features of positions", fontsize=9)
plt.show()

# %% [markdown]
# ### Training by simulated interaction
#
# SAM is trained the way it is used (appendix A, "Training algorithm"): the first prompt is a click
# drawn uniformly inside the target, or the target's box with noise; the model predicts three masks;
# the next click is drawn from the **error region** of the mask it picked (a foreground click where it
# missed the object, a background click where it spilled over) and the previous mask's logits come back
# as a mask prompt. The loss is 20·focal + 1·dice on the **best** of the three masks only, plus the
# squared error of each predicted IoU. SAM runs 11 such rounds per mask; here `sizes.rounds` (2).
# `ST.InteractiveTrainer` does all of it inside `forward(images, targets) -> (logits, loss)`, so the
# course's `train` loop trains it unchanged (its "tokens/s" are pixels/s). Trained once here, reused below.

# %%
# NBVAL_IGNORE_OUTPUT
t0 = time.perf_counter()
sam, hist, batches = LS.train_segmenter(sizes)
train_s = time.perf_counter() - t0
fig, ax = plt.subplots(figsize=(5.5, 3))
ax.plot(hist.steps, hist.train_loss, lw=1, alpha=0.7, label="train (mean over the rounds)")
ax.plot(hist.val_steps, hist.val_loss, "o-", label="held-out scenes")
ax.set_xlabel("optimizer step"), ax.set_ylabel("20·focal + dice + IoU MSE"), ax.grid(alpha=0.3), ax.legend()
plt.show()
print(f"{sam.num_params():,} parameters ({sam.num_params('encoder'):,} in the ViT), trained in {train_s:.0f} s")

# %% [markdown]
# ### Prompts: a click, a box, a mask
#
# On a held-out scene (seeds never used in training): each row is one prompt for the same object, then
# the three candidate masks with the IoU the model predicts for each and the real IoU with the ground
# truth. The chosen mask is the one of largest predicted IoU.

# %%
test_scenes = vdata.make_scenes(40, seed=123)
ev = ST.eval_set(sizes.n_eval, seed=123)
scene_i, outer, inner = LS.find_nested(test_scenes)
fig = LS.prompts_figure(sam, test_scenes[scene_i], outer)
plt.show()

# %% [markdown]
# ### The ambiguity: one click on a nested shape
#
# A click at the centre of the inner shape could mean the inner shape or the whole object. With one
# output the model would have to average the two; with three, different masks can take the different
# readings. Their IoUs with the inner shape and with the whole object:

# %%
amb = LS.ambiguity(sam, test_scenes[scene_i], outer, inner)
fig = LS.ambiguity_figure(test_scenes[scene_i], amb)
plt.show()

# %% [markdown]
# ### Measured like the field: mIoU after one click, clicks to 85 % and 90 %
#
# The protocol of interactive segmentation (Xu et al. 2016; RITM, Sofiiuk et al. 2022): each click goes
# to the point **deepest inside the larger error region** (the maximum of the distance transform), as
# a careful user would click; the first click is therefore at the centre of the object. We report mIoU
# after one click with the chosen mask and with the oracle best of three (SAM, section 7.1, reports
# both), and NoC@85 / NoC@90, the clicks needed to reach that IoU (the maximum when never reached).
# The trivial baseline is the target's own box, filled: it knows the box exactly.

# %%
# NBVAL_IGNORE_OUTPUT
res = LS.measure(sam, ev)
rows = ["miou_1click", "miou_1click_oracle", "miou_box", "miou_box_baseline", "noc85", "noc90"]
print({k: round(res[k], 3) for k in rows}, f"over {res['n_targets']} held-out objects")

# %%
# NBVAL_IGNORE_OUTPUT
k3 = res["curve_pred"][2]
display(Markdown(f"After one click the chosen mask reaches **{res['miou_1click']:.1%}** mIoU (oracle best of three "
                 f"{res['miou_1click_oracle']:.1%}); after three clicks **{k3:.1%}**; given the exact box it reaches "
                 f"**{res['miou_box']:.1%}** against **{res['miou_box_baseline']:.1%}** for the filled box itself. "
                 f"NoC@85 = {res['noc85']:.2f}, NoC@90 = {res['noc90']:.2f} clicks (at most {res['max_clicks']})."))
assert res["miou_box"] > res["miou_box_baseline"] and k3 > res["miou_box_baseline"]  # beats the box it is given
assert res["miou_1click_oracle"] >= res["miou_1click"]  # the oracle picks the best of the same three

# %% [markdown]
# ### A smaller encoder by distillation (MobileSAM)
#
# Nearly all of SAM's compute is its image encoder. MobileSAM (Zhang et al. 2023, section 3) trains a
# small encoder to reproduce the big one's **image embedding** (mean-squared error), on images alone,
# and then uses it with the big model's prompt encoder and mask decoder **unchanged** ("decoupled
# distillation"). The same here: a one-block ViT of width 32 learns the teacher's embedding.

# %%
# NBVAL_IGNORE_OUTPUT
student, dhist = LS.distill_encoder(sam, sizes)
res_s = LS.measure(student, ev)
batch = ev[0][:64]
speed = {name: dict(ms=ST.encoder_ms(m, batch), miou=r["curve_pred"][2], params=m.num_params("encoder"))
         for name, m, r in (("teacher", sam, res), ("distilled student", student, res_s))}
fig = LS.speed_quality_figure(speed)
plt.show()
fig = LS.curves_figure({"teacher": res, "student": res_s})
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
t, s = speed["teacher"], speed["distilled student"]
display(Markdown(f"The student's encoder has **{s['params']:,}** parameters against **{t['params']:,}**, runs in "
                 f"**{s['ms']:.2f}** ms per image against **{t['ms']:.2f}** ({t['ms'] / s['ms']:.1f}× faster, this CPU), "
                 f"and reaches **{s['miou']:.1%}** mIoU after three clicks against the teacher's **{t['miou']:.1%}**, "
                 f"never having seen a mask."))
assert s["params"] < t["params"] and res_s["curve_pred"][2] > res["miou_box_baseline"] - 0.1

# %% [markdown]
# ### Try it: place a click
#
# Move the sliders to click anywhere (pixel centres); the three masks and their predicted IoU follow.
# Try the inner shape of a nested object, its ring, and the background. A static view of three clicks
# follows for readers without a running kernel.

# %%
LS.click_demo(sam, test_scenes[:10])

# %%
fig = plt.figure(figsize=(8, 2.3))
LS.draw_click(sam, test_scenes[scene_i], float(amb["point"][0]), float(amb["point"][1]), fig)
plt.show()

# %% [markdown]
# ### Limits, and how the real SAM differs in scale
#
# - **Data**: a few thousand 32 × 32 scenes of four flat-coloured shapes; the real SAM trained on
#   **SA-1B: 1.1 billion masks on 11 million images** (Kirillov et al. 2023, section 5). Nothing here says
#   how the model does on photographs.
# - **Model**: the teacher's encoder is a tiny ViT; SAM's is an MAE-pretrained **ViT-H/16** with 14 × 14
#   windowed attention and four global blocks, on **1024 × 1024** inputs giving a 64 × 64 embedding of
#   width 256 (appendix A); **632M** parameters, against 4M for the prompt encoder and mask decoder
#   together (the project's FAQ, segment-anything.com). MobileSAM replaces it by a **Tiny-ViT of about 5M**
#   parameters (Zhang et al. 2023; the MobileSAM README: 8 ms against 452 ms per image on one GPU, trained
#   on 100k images, 1% of SA-1B, on one GPU in under a day).
# - **Decoder**: the same two-way design, at width 64 instead of 256; SAM has a fourth output token for
#   unambiguous multi-prompt cases, omitted here; and this decoder adds SAM 2-style high-resolution
#   features (Ravi et al. 2024), since a 4-pixel patch grid alone blurs edges of 32-pixel images.
# - **Training**: 2 simulated rounds instead of 11; a minute on a CPU instead of 3–5 days on 256 A100
#   GPUs (segment-anything.com FAQ). Text prompts need this chapter's CLIP text encoder; `SAMConfig(text_dim=...)` accepts
#   its embeddings, and training them follows SAM appendix D.5 (CLIP image embeddings of the object's
#   crop, `ST.object_crops`).
