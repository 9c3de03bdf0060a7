"""A promptable segmenter in the spirit of SAM: image encoder, prompt encoder, two-way mask decoder.

Segment Anything (Kirillov et al. 2023, section 3 and appendix A), small enough for a CPU:
- image encoder: course.vision.vit.ViT (SAM: an MAE-pretrained ViT-H/16 with 14x14 windowed attention
  and four global blocks, 1024x1024 input, a 64x64 embedding) and SAM's neck, a 1x1 then a 3x3
  convolution to the decoder width, each followed by a LayerNorm over channels;
- prompt encoder: a point is a positional encoding of its location plus one of two learned embeddings
  (foreground / background); a box is the pair (top-left corner encoding + a learned "top-left"
  embedding, bottom-right likewise); the encoding is random Fourier features (Tancik et al. 2020,
  "Fourier features let networks learn high frequency functions"): [sin 2πBv, cos 2πBv] with v the
  point in [-1, 1]² and B a fixed Gaussian (2, C/2) matrix. A mask prompt (logits, at the decoder's
  output resolution, 4x the embedding grid) goes through two 2x2 stride-2 convolutions (4 and 16
  channels, LayerNorm and GELU between) and a 1x1 convolution to C, and is ADDED to the image
  embedding; without one, a learned "no mask" embedding is added. A text prompt is an embedding from
  CLIP's text encoder (course.vision.clip), linearly projected to one token (SAM appendix D.5).
- mask decoder: output tokens (one IoU token, three mask tokens) joined with the prompt tokens; each of
  `depth` two-way blocks runs (1) self-attention of the tokens, (2) cross-attention tokens -> image,
  (3) an MLP on the tokens, (4) cross-attention image -> tokens, each with a residual and a LayerNorm;
  positional encodings are re-added to the image embedding and the original prompt tokens to the
  tokens at every attention. A last token -> image attention, then the image embedding is upsampled
  4x by two transposed convolutions, and each mask token, through its own 3-layer MLP, becomes the
  weights of a per-pixel dot product: mask logits. A 3-layer MLP on the IoU token predicts each mask's
  IoU. Cross-attention works at half width (SAM's downsample rate 2).
SAM has a fourth mask token whose single mask it returns when several prompts make the target clear;
here the three masks are always returned and the one of largest predicted IoU is used.
High-resolution features (`hires`, default on): a plain ViT with 4-pixel patches loses the shapes' edges, and
SAM 2 (Ravi et al. 2024, section 4) feeds its hierarchical encoder's stride-4 and stride-8 features into the
two upsampling layers; here a two-layer convolutional stem on the image gives those two maps (computed
once per image with the embedding). `hires=False` is SAM's decoder exactly.

Coordinates follow course.vision.data: a point is (x, y) in pixels, pixel (row i, column j) covers
[j, j+1) x [i, i+1). Boxes are (x0, y0, x1, y1). Point labels: 1 foreground, 0 background, -1 padding
(ignored: lets a batch hold different numbers of clicks); internally box corners are labels 2 and 3
(as SAM 2's code feeds a box: two points labelled 2 and 3).

Shapes: images (B, 3, S, S); points (B, N, 2); labels (B, N); boxes (B, 4); masks (B, 1, S, S) logits;
text (B, text_dim); out: mask logits (B, 3, S, S), predicted IoU (B, 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import ViT, ViTConfig, check_images

PROMPT_KINDS = ("points", "labels", "boxes", "masks", "text")
NEG, POS, TOP_LEFT, BOTTOM_RIGHT, PAD = 0, 1, 2, 3, -1


@dataclass
class SAMConfig:
    image_size: int = 32
    patch_size: int = 4
    enc_layers: int = 2  # SAM ViT-H: 32 blocks of width 1280
    enc_heads: int = 4
    enc_dim: int = 64
    window: int = 0  # windowed encoder blocks (0: all global), as ViTConfig
    dim: int = 64  # prompt / decoder width (SAM: 256)
    heads: int = 4  # decoder heads (SAM: 8)
    depth: int = 2  # two-way blocks (SAM: 2)
    mlp_dim: int = 256  # token MLP (SAM: 2048)
    downsample: int = 2  # cross-attention width dim / downsample (SAM: 2)
    n_masks: int = 3
    text_dim: int = 0  # > 0: accept text prompts of this embedding width
    pe_scale: float = 1.0  # std of the Fourier matrix B (SAM: 1)
    hires: bool = True  # SAM 2's high-resolution features in the upsampling (False: SAM's decoder)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "hires":
                if not isinstance(v, bool):
                    raise ValueError(f"SAMConfig.hires must be True or False, got {v!r}")
            elif f.name == "pe_scale":
                if not isinstance(v, (int, float)) or not v > 0:
                    raise ValueError(f"SAMConfig.pe_scale must be > 0, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < (0 if f.name in ("window", "text_dim") else 1):
                raise ValueError(f"SAMConfig.{f.name} must be a positive integer, got {v!r}")
        for name, d in (("dim", self.heads), ("dim", 8 * self.downsample), ("dim", 16)):
            if self.dim % d:
                raise ValueError(f"SAMConfig.dim={self.dim} must be divisible by {d} (heads, 8·downsample and 16)")
        self.encoder_config()  # the ViT's own checks (patch divides the image ...)

    def encoder_config(self) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, n_layer=self.enc_layers,
                         n_head=self.enc_heads, n_embd=self.enc_dim, window=self.window)

    @property
    def grid(self) -> int:  # image embedding side
        return self.image_size // self.patch_size

    @property
    def mask_size(self) -> int:  # decoder output side, 4x the embedding (SAM: 256 for a 64 grid)
        return 4 * self.grid

    def replace(self, **kw) -> "SAMConfig":
        return SAMConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **kw})


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def mlp(d_in, d_hidden, d_out, layers=3):
    dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
    mods = []
    for i in range(layers):
        mods += [nn.Linear(dims[i], dims[i + 1])] + ([nn.ReLU()] if i < layers - 1 else [])
    return nn.Sequential(*mods)


class FourierPE(nn.Module):
    """Random Fourier features of 2-D positions: (..., 2) in [0, 1]² -> (..., dim) (Tancik et al. 2020)."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("B", scale * torch.randn(2, dim // 2))  # fixed, not learned (as SAM)

    def forward(self, xy01: torch.Tensor) -> torch.Tensor:
        z = 2 * math.pi * (2 * xy01 - 1) @ self.B.to(xy01.dtype)  # (..., dim/2)
        return torch.cat([z.sin(), z.cos()], dim=-1)

    def grid(self, g: int) -> torch.Tensor:
        """(dim, g, g): the encoding of every embedding cell's centre."""
        c = (torch.arange(g, dtype=self.B.dtype, device=self.B.device) + 0.5) / g
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        return self(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.cfg, C = cfg, cfg.dim
        self.pe = FourierPE(C, cfg.pe_scale)
        self.label_embed = nn.Embedding(4, C)  # background, foreground, top-left corner, bottom-right corner
        self.not_a_point = nn.Parameter(torch.zeros(C))  # padding points
        self.no_mask = nn.Parameter(torch.zeros(C))
        self.mask_down = nn.Sequential(nn.Conv2d(1, 4, 2, 2), LayerNorm2d(4), nn.GELU(), nn.Conv2d(4, 16, 2, 2),
                                       LayerNorm2d(16), nn.GELU(), nn.Conv2d(16, C, 1))
        self.text_proj = nn.Linear(cfg.text_dim, C) if cfg.text_dim else None
        for p in (self.not_a_point, self.no_mask):
            nn.init.normal_(p, std=0.02)

    def forward(self, points=None, labels=None, boxes=None, masks=None, text=None, batch=None):
        """-> sparse (B, T, C) prompt tokens, dense (B, C, g, g) mask embedding. Inputs checked by check_prompts."""
        cfg, S = self.cfg, self.cfg.image_size
        tokens = []
        if boxes is not None:  # a box as two labelled corner points
            corners = boxes.reshape(-1, 2, 2)
            lab = torch.tensor([TOP_LEFT, BOTTOM_RIGHT], device=boxes.device).expand(len(boxes), 2)
            points = corners if points is None else torch.cat([points, corners], 1)
            labels = lab if labels is None else torch.cat([labels, lab], 1)
        if points is not None:
            pe = self.pe(points / S)  # (B, N, C)
            real = (labels >= 0).unsqueeze(-1)
            emb = self.label_embed(labels.clamp(min=0))
            tokens.append(torch.where(real, pe + emb, self.not_a_point.to(pe.dtype).expand_as(pe)))
        if text is not None:
            tokens.append(self.text_proj(text).unsqueeze(1))  # (B, 1, C)
        B = batch if batch is not None else len((tokens[0] if tokens else masks))
        sparse = torch.cat(tokens, 1) if tokens else self.no_mask.new_zeros(B, 0, cfg.dim)
        if masks is not None:
            if masks.shape[-1] != cfg.mask_size:  # user masks at image size -> the decoder's output size
                masks = F.interpolate(masks, size=(cfg.mask_size,) * 2, mode="bilinear", align_corners=False)
            dense = self.mask_down(masks)  # (B, C, g, g)
        else:
            dense = self.no_mask.view(1, -1, 1, 1).expand(B, -1, cfg.grid, cfg.grid)
        return sparse, dense


class Attention(nn.Module):
    """Multi-head attention whose q, k, v live at width `inner` (SAM downsamples cross-attention to C/2)."""

    def __init__(self, dim: int, heads: int, inner: int | None = None):
        super().__init__()
        inner = inner or dim
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, inner), nn.Linear(dim, inner),
                                            nn.Linear(dim, inner), nn.Linear(inner, dim))

    def forward(self, q, k, v):  # (B, Nq, C), (B, Nk, C), (B, Nk, C) -> (B, Nq, C)
        def split(x):  # (B, N, inner) -> (B, h, N, inner/h)
            return x.view(x.size(0), x.size(1), self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(k)), split(self.v(v)))
        return self.out(o.transpose(1, 2).reshape(q.size(0), q.size(1), -1))


class TwoWayBlock(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        C, h, inner = cfg.dim, cfg.heads, cfg.dim // cfg.downsample
        self.self_attn, self.t2i, self.i2t = Attention(C, h), Attention(C, h, inner), Attention(C, h, inner)
        self.mlp = nn.Sequential(nn.Linear(C, cfg.mlp_dim), nn.ReLU(), nn.Linear(cfg.mlp_dim, C))
        self.norms = nn.ModuleList(nn.LayerNorm(C) for _ in range(4))

    def forward(self, tok, img, tok_pe, img_pe):  # tok (B, T, C), img (B, g·g, C)
        q = tok + tok_pe
        tok = self.norms[0](tok + self.self_attn(q, q, tok))  # (1) tokens attend to each other
        tok = self.norms[1](tok + self.t2i(tok + tok_pe, img + img_pe, img))  # (2) tokens -> image
        tok = self.norms[2](tok + self.mlp(tok))  # (3) MLP on the tokens
        img = self.norms[3](img + self.i2t(img + img_pe, tok + tok_pe, tok))  # (4) image -> tokens
        return tok, img


class MaskDecoder(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        C, M = cfg.dim, cfg.n_masks
        self.cfg = cfg
        self.iou_token, self.mask_tokens = nn.Parameter(torch.randn(1, C) * 0.02), nn.Parameter(torch.randn(M, C) * 0.02)
        self.blocks = nn.ModuleList(TwoWayBlock(cfg) for _ in range(cfg.depth))
        self.final_attn, self.final_norm = Attention(C, cfg.heads, C // cfg.downsample), nn.LayerNorm(C)
        self.upscale = nn.Sequential(nn.ConvTranspose2d(C, C // 4, 2, 2), LayerNorm2d(C // 4), nn.GELU(),
                                     nn.ConvTranspose2d(C // 4, C // 8, 2, 2), nn.GELU())
        self.hyper = nn.ModuleList(mlp(C, C, C // 8) for _ in range(M))
        self.iou_head = mlp(C, C, M)

    def forward(self, image_emb, image_pe, sparse, dense, hires=None):
        """image_emb (B, C, g, g), image_pe (C, g, g), sparse (B, T, C), dense (B, C, g, g), hires None or
        ((B, C/8, 4g, 4g), (B, C/4, 2g, 2g)) -> mask logits (B, M, 4g, 4g), predicted IoU (B, M)."""
        B, C, g, _ = image_emb.shape
        M = self.cfg.n_masks
        out = torch.cat([self.iou_token, self.mask_tokens]).unsqueeze(0).expand(B, -1, -1)
        tokens = torch.cat([out.to(sparse.dtype), sparse], 1)  # (B, 1+M+T, C)
        img = (image_emb + dense).flatten(2).transpose(1, 2)  # (B, g·g, C)
        img_pe = image_pe.flatten(1).T.unsqueeze(0)  # (1, g·g, C)
        tok = tokens
        for blk in self.blocks:
            tok, img = blk(tok, img, tokens, img_pe)
        tok = self.final_norm(tok + self.final_attn(tok + tokens, img + img_pe, img))
        x = img.transpose(1, 2).reshape(B, C, g, g)
        if hires is None:
            up = self.upscale(x)  # (B, C/8, 4g, 4g)
        else:  # SAM 2: add the stride-8 map after the first upsampling, the stride-4 map after the second
            ln, act = self.upscale[1], self.upscale[2]
            up = act(ln(self.upscale[0](x) + hires[1]))  # (B, C/4, 2g, 2g)
            up = self.upscale[4](self.upscale[3](up) + hires[0])  # (B, C/8, 4g, 4g)
        w = torch.stack([self.hyper[i](tok[:, 1 + i]) for i in range(M)], 1)  # (B, M, C/8)
        masks = (w @ up.flatten(2)).view(B, M, 4 * g, 4 * g)
        return masks, self.iou_head(tok[:, 0])


def _shape(x):
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_prompts(cfg: SAMConfig, B: int, points=None, labels=None, boxes=None, masks=None, text=None) -> None:
    """ValueError naming the problem: points outside the image, bad labels, boxes of non-positive size,
    wrong shapes, text without a text projection, or a row with no prompt at all."""
    S = cfg.image_size
    given = torch.zeros(B, dtype=torch.bool)
    if (points is None) != (labels is None):
        raise ValueError("points and labels come together: labels[b, n] is 1 (foreground), 0 (background) or -1 (padding)")
    if points is not None:
        if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[::2] != (B, 2):
            raise ValueError(f"points must be a ({B}, n_points, 2) tensor of (x, y) pixels, got {_shape(points)}")
        if not isinstance(labels, torch.Tensor) or labels.shape != points.shape[:2]:
            raise ValueError(f"labels must be a {tuple(points.shape[:2])} tensor, got {_shape(labels)}")
        bad = set(labels.unique().tolist()) - {NEG, POS, PAD}
        if bad:
            raise ValueError(f"labels must be 1 (foreground), 0 (background) or -1 (padding), got {sorted(bad)}")
        real = labels >= 0
        p = points[real]
        if not torch.isfinite(p).all() or (p < 0).any() or (p > S).any():
            raise ValueError(f"points outside the image: every (x, y) must lie in [0, {S}] x [0, {S}], got "
                             f"x in [{p[:, 0].min().item():.1f}, {p[:, 0].max().item():.1f}], "
                             f"y in [{p[:, 1].min().item():.1f}, {p[:, 1].max().item():.1f}]")
        given |= real.any(1).cpu()
    if boxes is not None:
        if not isinstance(boxes, torch.Tensor) or boxes.shape != (B, 4):
            raise ValueError(f"boxes must be a ({B}, 4) tensor of (x0, y0, x1, y1), got {_shape(boxes)}")
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        if not (w > 0).all() or not (h > 0).all():
            i = int(((w <= 0) | (h <= 0)).nonzero()[0])
            raise ValueError(f"box {i} has a non-positive size (width {w[i].item():g}, height {h[i].item():g}): "
                             f"boxes are (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
        if (boxes < 0).any() or (boxes > S).any():
            raise ValueError(f"boxes outside the image: coordinates must lie in [0, {S}]")
        given[:] = True
    if masks is not None:
        if not isinstance(masks, torch.Tensor) or masks.dim() != 4 or masks.shape[:2] != (B, 1) \
                or masks.shape[-1] not in (S, cfg.mask_size) or masks.shape[-2] != masks.shape[-1]:
            raise ValueError(f"masks must be ({B}, 1, {S}, {S}) logits, got {_shape(masks)}")
        given[:] = True
    if text is not None:
        if not cfg.text_dim:
            raise ValueError("a text prompt needs SAMConfig(text_dim=...) (the width of CLIP's text embedding)")
        if not isinstance(text, torch.Tensor) or text.shape != (B, cfg.text_dim):
            raise ValueError(f"text must be a ({B}, {cfg.text_dim}) tensor of text embeddings, got {_shape(text)}")
        given[:] = True
    if not given.all():
        raise ValueError(f"empty prompt for image {int((~given).nonzero()[0])}: give at least one point (label 0/1), "
                         f"a box, a mask or a text")


class Embedding(NamedTuple):
    image: torch.Tensor  # (B, C, g, g): what the ViT and neck compute (and what distillation matches)
    hires: tuple | None  # SAM 2-style high-resolution maps, or None


class SAM(nn.Module):
    def __init__(self, cfg: SAMConfig, encoder: nn.Module | None = None):
        super().__init__()
        if not isinstance(cfg, SAMConfig):
            raise TypeError(f"cfg must be a SAMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else ViT(cfg.encoder_config())
        enc_dim = self.encoder.config.n_embd
        self.neck = nn.Sequential(nn.Conv2d(enc_dim, cfg.dim, 1, bias=False), LayerNorm2d(cfg.dim),
                                  nn.Conv2d(cfg.dim, cfg.dim, 3, padding=1, bias=False), LayerNorm2d(cfg.dim))
        C = cfg.dim
        self.hires = nn.ModuleList([nn.Sequential(nn.Conv2d(3, C // 8, 3, padding=1), nn.GELU()),
                                    nn.Conv2d(C // 8, C // 4, 3, stride=2, padding=1)]) if cfg.hires else None
        self.prompt_encoder = PromptEncoder(cfg)
        self.decoder = MaskDecoder(cfg)

    def hires_features(self, images):
        """((B, C/8, 4g, 4g), (B, C/4, 2g, 2g)) from the image, or None without cfg.hires."""
        if self.hires is None:
            return None
        x = images if images.shape[-1] == self.cfg.mask_size else F.interpolate(images, size=(self.cfg.mask_size,) * 2,
                                                                                mode="area")
        s0 = self.hires[0](x)
        return s0, self.hires[1](s0)

    def embed_image(self, images: torch.Tensor) -> Embedding:
        """(B, 3, S, S) -> Embedding(image (B, C, g, g), hires): once per image, reused for every prompt."""
        check_images(images, 3, self.cfg.image_size)
        return Embedding(self.neck(self.encoder.feature_map(images)), self.hires_features(images))

    def decode(self, embedding: Embedding, check: bool = True, **prompts):
        """Prompts (points, labels, boxes, masks, text) on an image embedding -> (mask logits (B, M, S, S),
        predicted IoU (B, M))."""
        unknown = set(prompts) - set(PROMPT_KINDS)
        if unknown:
            raise ValueError(f"unknown prompt type(s) {sorted(unknown)}: known are {PROMPT_KINDS}")
        emb = embedding.image
        if check:
            check_prompts(self.cfg, len(emb), **prompts)
        sparse, dense = self.prompt_encoder(**prompts, batch=len(emb))
        pe = self.prompt_encoder.pe.grid(self.cfg.grid).to(emb.dtype)
        logits, iou = self.decoder(emb, pe, sparse.to(emb.dtype), dense.to(emb.dtype), embedding.hires)
        if logits.shape[-1] != self.cfg.image_size:  # SAM upsamples its 256² logits to 1024² bilinearly
            logits = F.interpolate(logits, size=(self.cfg.image_size,) * 2, mode="bilinear", align_corners=False)
        return logits, iou

    def predict(self, images: torch.Tensor, **prompts):
        return self.decode(self.embed_image(images), **prompts)

    def num_params(self, part: str | None = None) -> int:
        mod = self if part is None else getattr(self, part)
        return sum(p.numel() for p in mod.parameters())
