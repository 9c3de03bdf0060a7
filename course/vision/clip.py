"""CLIP: an image encoder and a text encoder trained so that matching pairs have the larger cosine.

Radford et al. 2021, "Learning transferable visual models from natural language supervision":
- figure 3: embed a batch of N (image, text) pairs, L2-normalise both, logits = scale · I Tᵀ (N, N),
  and average the cross-entropies of rows (each image against every text) and columns (each text
  against every image) with the matching pair, the diagonal, as the target;
- section 2.5: the temperature τ is learned, as a log-parameterised multiplicative scale 1/τ,
  initialised to the equivalent of τ = 0.07 and clipped "to prevent scaling the logits by more than
  100"; the text encoder is a transformer with masked (causal) self-attention whose highest-layer
  activation at the [EOS] token, LayerNormed and linearly projected, is the text embedding; the image
  encoder here is course.vision.vit.ViT (pooled patch features, then a linear projection, section 2.4).
- zero-shot classification (section 3.1.2): embed one prompt per class ("a red circle") and pick the
  class whose text embedding has the largest cosine with the image's.

Data parallel (what CLIP did on 592 GPUs, section 2.5): the negatives of the contrastive loss are the
other pairs of the GLOBAL batch, so every rank all-gathers the embeddings, puts its own tensors in
its slot (the only ones carrying gradients) and computes the same global loss. All-gather's backward is
a reduce-scatter, the sum over ranks of each slot's gradient; every rank computes the identical loss
from the identical gathered tensor, so each rank's gradient for its slot is the same and the sum is
world × the local one: `gather_embeddings` returns that with no communication in backward (open_clip's
`gather_features`, without `gather_with_grad`, does the same up to this factor). Averaging the
parameter gradients over ranks (DataParallel) then gives exactly the single-process gradient.

Sizes here: 32×32 images, 16 patches, two-block encoders of width 64 (about 0.2M parameters), trained for a
few hundred steps on generated scenes; CLIP's largest ViT-L/14@336px saw 400M pairs for 32 epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..model import ModelConfig, Transformer, check_tokens
from . import data as vdata
from .vit import ViT, ViTConfig

MAX_LOGIT_SCALE = 100.0  # section 2.5: logits never scaled by more than 100
INIT_TEMPERATURE = 0.07  # section 2.5, from Wu et al. 2018


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE (figure 3): image_emb, text_emb (N, D) for N matching pairs, any norm;
    logit_scale = 1/temperature (a float or a 0-d tensor). Returns the scalar loss."""
    for name, t in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a (batch, dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must have the same "
                         f"shape: one text per image")
    if len(image_emb) < 2:
        raise ValueError(f"a contrastive loss needs at least 2 pairs (the others are the negatives), got {len(image_emb)}")
    img, txt = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale * img @ txt.T  # (N, N): row i = image i against every text
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class _GatherLocalGrad(torch.autograd.Function):
    """(n, D) per rank -> (world·n, D); backward: world × this rank's slot (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.rank, ctx.world, ctx.n = comm.rank, comm.world, x.size(0)
        full = x.new_empty(comm.world * x.size(0), *x.shape[1:])
        comm.all_gather(full, x.contiguous(), name="clip embeddings")
        return full

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n] * ctx.world, None


def gather_embeddings(x: torch.Tensor, comm) -> torch.Tensor:
    """All ranks' (n, D) embeddings in rank order, (world·n, D); gradients flow to this rank's slot only."""
    if comm is None or comm.world == 1:
        return x
    return _GatherLocalGrad.apply(x, comm)


@dataclass
class CLIPConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    vocab_size: int = vdata.WordTokenizer().vocab_size
    context: int = 8  # longest caption in tokens, [EOS] included
    text_layers: int = 2
    text_heads: int = 4
    text_width: int = 64
    embed_dim: int = 32  # the shared embedding space

    def __post_init__(self):
        if not isinstance(self.vit, ViTConfig):
            raise ValueError(f"CLIPConfig.vit must be a ViTConfig, got {type(self.vit).__name__}")
        if self.vit.n_classes:
            raise ValueError(f"CLIPConfig.vit.n_classes must be 0 (CLIP projects the pooled feature), got {self.vit.n_classes}")
        if not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
            raise ValueError(f"CLIPConfig.embed_dim must be a positive integer, got {self.embed_dim!r}")
        self.text_config()

    def text_config(self) -> ModelConfig:
        return ModelConfig.gpt(vocab_size=self.vocab_size, block_size=self.context, n_layer=self.text_layers,
                               n_head=self.text_heads, n_embd=self.text_width)


class TextEncoder(nn.Module):
    """The course Transformer (causal, as CLIP's) read at each caption's [EOS] token: (B, L) ids -> (B, width)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transformer = Transformer(cfg)  # its tied lm_head is unused: no extra parameters

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_tokens(tokens, self.transformer.config.vocab_size, "tokens")
        lengths = (tokens != 0).sum(1)  # (B,) words + [EOS]; padding (0) only after [EOS]
        if bool((lengths == 0).any()):
            raise ValueError("tokens holds an empty caption (all [PAD]): encode captions with WordTokenizer.encode")
        h = self.transformer.hidden_states(tokens)  # (B, L, width); causal: [EOS] sees the caption, not the padding
        return h[torch.arange(len(tokens)), lengths - 1]  # (B, width) at [EOS]


class CLIP(nn.Module):
    """forward(images (B, 3, H, W), tokens (B, L)) -> (logits (B, B_global) image vs text, loss)."""

    def __init__(self, cfg: CLIPConfig | None = None, comm=None):
        super().__init__()
        self.config = cfg = cfg or CLIPConfig()
        self.image = ViT(cfg.vit)
        self.text = TextEncoder(cfg.text_config())
        self.image_proj = nn.Linear(cfg.vit.n_embd, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))  # log(1/τ)
        self.comm = comm  # a course Comm over the data-parallel ranks: negatives from the global batch

    @property
    def logit_scale(self) -> torch.Tensor:
        """1/τ, clamped at 100 (no gradient pushes it further while clamped)."""
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image.embed(images)), dim=-1)  # (B, E), unit length

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)  # (B, E), unit length

    def forward(self, images, tokens):
        if images.size(0) != tokens.size(0):
            raise ValueError(f"images ({images.size(0)}) and tokens ({tokens.size(0)}) must pair one caption per image")
        img = gather_embeddings(self.encode_image(images), self.comm)  # (B_global, E)
        txt = gather_embeddings(self.encode_text(tokens), self.comm)  # (B_global, E)
        scale = self.logit_scale
        return scale * img @ txt.T, contrastive_loss(img, txt, scale)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def similarity(model: CLIP, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N_images, N_texts) cosine similarities."""
    model.eval()
    return model.encode_image(images) @ model.encode_text(tokens).T


def class_tokens(pairs=vdata.PAIRS, tokenizer: vdata.WordTokenizer | None = None, context: int = 8) -> torch.Tensor:
    """(n_classes, L) prompt ids, one 'a {colour} {shape}' per pair."""
    tok = tokenizer or vdata.WordTokenizer()
    return tok.encode([vdata.prompt(c, s) for c, s in pairs], context)


@torch.no_grad()
def zero_shot(model: CLIP, images: torch.Tensor, pairs=vdata.PAIRS) -> torch.Tensor:
    """(N,) index into `pairs` of the prompt with the largest cosine to each image (section 3.1.2)."""
    if not pairs:
        raise ValueError("pairs is empty: zero-shot classification needs at least one candidate class")
    return similarity(model, images, class_tokens(pairs, context=model.config.context)).argmax(dim=1)


def zero_shot_accuracy(model: CLIP, images: torch.Tensor, labels: torch.Tensor, pairs=vdata.PAIRS) -> float:
    """Fraction of images whose zero-shot class is right; labels index vdata.PAIRS."""
    pred = [pairs[i] for i in zero_shot(model, images, pairs).tolist()]
    return sum(p == vdata.PAIRS[y] for p, y in zip(pred, labels.tolist())) / len(pred)


class CaptionBatches:
    """batch_fn for course.train.train: split -> (images (B, 3, H, W), tokens (B, L)) drawn from a fixed pool."""

    def __init__(self, n_train: int = 2000, n_val: int = 256, batch_size: int = 64, size: int = 32,
                 nest_prob: float = 0.5, context: int = 8, seed: int = 0):
        tok = vdata.WordTokenizer()
        self.pools = {}
        for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1)):
            d = vdata.caption_data(n, seed=s, size=size, split="train", nest_prob=nest_prob)
            self.pools[split] = (d.images, tok.encode(d.captions, context))
        if not isinstance(batch_size, int) or not 2 <= batch_size <= n_val:
            raise ValueError(f"batch_size must be an integer in [2, n_val={n_val}], got {batch_size!r}")
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, split: str):
        if split not in self.pools:
            raise ValueError(f"split must be one of {tuple(self.pools)}, got {split!r}")
        images, tokens = self.pools[split]
        idx = torch.randperm(len(images), generator=self.gen)[:self.batch_size]
        return images[idx], tokens[idx]


# ----------------------------------------------------------------------------- data-parallel check


def dp_loss_and_grads(cfg: CLIPConfig, seed: int, batch: int):
    """On each rank: this rank's slice of one global batch, the loss with all-gathered embeddings and
    the parameter gradients averaged over ranks, float64. Returns (loss, {name: grad})."""
    from ..parallel.comm import Comm
    comm = Comm()
    torch.manual_seed(seed)
    model = CLIP(cfg, comm=comm).double()
    images, tokens = _global_batch(cfg, seed, batch)
    n = batch // comm.world
    part = slice(comm.rank * n, (comm.rank + 1) * n)
    _, loss = model(images[part], tokens[part])
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[name] = g / comm.world  # what DataParallel's averaging gives
    return loss.item(), grads


def single_loss_and_grads(cfg: CLIPConfig, seed: int, batch: int):
    """The same global batch in one process, float64."""
    torch.manual_seed(seed)
    model = CLIP(cfg).double()
    images, tokens = _global_batch(cfg, seed, batch)
    _, loss = model(images, tokens)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _global_batch(cfg: CLIPConfig, seed: int, batch: int):
    d = vdata.caption_data(batch, seed=seed, size=cfg.vit.image_size, nest_prob=0.5)
    return d.images.double(), vdata.WordTokenizer().encode(d.captions, cfg.context)
