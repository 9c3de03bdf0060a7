# %% [markdown]
# ## Your turn
#
# Stuck? `print(solution("10.patchify"))`.
#
# **1. Images as sequences** (ViT, Dosovitskiy et al. 2021, section 3.1). Cut `(B, C, H, W)` images into
# `P × P` patches, in row-major order over the patch grid (left to right, then top to bottom), and flatten
# each patch channel-first, as `(C, P, P)`: the result is `(B, N, C·P·P)` with `N = HW / P²`.

# %%
# NBVAL_CHECK_OUTPUT
import torch
import torch.nn.functional as F

from course.exercises import lesson10 as ex, solution


def patchify(images, patch):
    raise NotImplementedError  # your code here


ok = ex.check_patchify(patchify)

# %% [markdown]
# **2. CLIP's contrastive loss** (Radford et al. 2021, figure 3). For `N` matching (image, text) pairs
# with embeddings `(N, D)`: L2-normalise both, `logits = image @ textᵀ / temperature`, and average the
# cross-entropy of each image against all texts and of each text against all images. The matching pair,
# on the diagonal, is the target.

# %%
# NBVAL_CHECK_OUTPUT
def clip_loss(image_emb, text_emb, temperature):
    raise NotImplementedError  # your code here


ok = ex.check_clip_loss(clip_loss)
