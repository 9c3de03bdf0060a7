"""A Vision Transformer on the course's shared transformer blocks.

ViT (Dosovitskiy et al. 2021, "An image is worth 16x16 words", section 3.1): cut the image (C, H, W) into
N = HW/P² patches, flatten each to C·P² values, project linearly to D, add position embeddings, run a
transformer encoder (no causal mask), and classify from a pooled feature. Two choices differ from the
paper's default, both from later work:
- positions are FIXED 2-D sin-cos embeddings: half the channels encode the patch column, half the row,
  each as [sin(p·ω_i), cos(p·ω_i)] with ω_i = 10000^(-i/(D/4)) (MoCo v3, Chen, Xie & He 2021, and MAE,
  He et al. 2022, whose `pos_embed.py` follows MoCo v3's). ViT itself learns them (section 3.1;
  `ViTConfig(pos="learned")` does that) and found 2-D-aware variants no better (appendix D.4).
- the image feature is the mean over patch tokens (global average pooling) instead of a [class] token;
  the ViT paper compares the two (appendix D.3) and reaches the same accuracy with a tuned learning rate.
  SAM's image encoder has no class token either: it keeps the whole grid as the image embedding.

Windowed attention (ViTDet, Li et al. 2022, section 3; SAM's encoder, Kirillov et al. 2023, appendix A):
most blocks attend only inside non-overlapping w×w windows of the patch grid, a few "global" blocks
attend everywhere (SAM's ViT-H: 14×14 windows, four global blocks spread evenly). Here a windowed
block is the same shared `Block` given a fixed boolean mask, True where two patches share a window;
chapter 03's patterns (course/sparse/patterns.py) are 1-D bands over sequence positions, and a 2-D
window is a band only after reordering the tokens window by window, so a mask states it directly.
The mask gives exactly windowed attention's result (ViTDet partitions instead, to save the compute).

Because the encoder is `course.model.Block`s run through the `runner` seam, `course.parallelize`
applies here unchanged: recomputation policies (`Plan(recompute="sqrt")`), attention cores
(`set_attention`, `course.model.attention_maps`), ZeRO / FSDP over `blocks`, data parallel.

API (stable; course.vision.clip and sam build on it):
- `patchify(images, patch) -> (B, N, C·P·P)`: row-major over the grid, each patch flattened (C, P, P).
- `sincos_2d(grid_h, grid_w, dim) -> (grid_h·grid_w, dim)`; `window_mask(grid_h, grid_w, window) -> (N, N)`.
- `ViTConfig(image_size, patch_size, in_chans, n_layer, n_head, n_embd, n_classes, window, global_blocks,
  pos, dropout)`; `.grid` (patches per side), `.num_patches`, `.model_config()`.
- `ViT(cfg)`: `features(images) -> (B, N, D)` after the final LayerNorm; `feature_map(images) ->
  (B, D, grid, grid)` (SAM's image embedding layout); `embed(images) -> (B, D)` pooled;
  `forward(images, targets=None, attn_mask=None) -> (logits (B, n_classes) or the pooled (B, D), loss)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import Block, ModelConfig, Transformer, run_blocks

POSITIONS = ("sincos", "learned")


def _check_int(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_images(images, in_chans: int | None = None, size: int | None = None, name: str = "images") -> None:
    """ValueError/TypeError unless images is a float (B, C, H, W) tensor (of in_chans channels, H = W = size)."""
    if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor (B, C, H, W), got "
                        f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must be (batch, channels, height, width), got shape {tuple(images.shape)}; "
                         f"add a batch dimension with {name}[None] for one image")
    if in_chans is not None and images.size(1) != in_chans:
        raise ValueError(f"{name} has {images.size(1)} channels, the model expects in_chans={in_chans}")
    if size is not None and tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"{name} is {images.size(2)}x{images.size(3)} pixels, the model expects "
                         f"image_size={size} (its position table is fixed): resize or build ViTConfig(image_size=...)")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C·P·P), N = (H/P)·(W/P): patches row-major, each flattened channel-first."""
    check_images(images)
    _check_int("patch", patch, 1)
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {patch}: "
                         f"crop or pad to a multiple of {patch}")
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)  # (B, C, gh, P, gw, P)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(p ω_i) for i < dim/2, cos(p ω_i) ...], ω_i = 10000^(-i/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (dim/2,)
    angle = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """(grid_h·grid_w, dim) float32, row-major like patchify: first dim/2 channels encode the column (x),
    the last dim/2 the row (y) (MoCo v3's and MAE's 2-D sin-cos)."""
    _check_int("grid_h", grid_h, 1), _check_int("grid_w", grid_w, 1)
    if not isinstance(dim, int) or dim <= 0 or dim % 4:
        raise ValueError(f"dim must be a positive multiple of 4 for 2-D sin-cos positions (sin and cos for x and y), "
                         f"got {dim!r}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (gh, gw) each
    emb = torch.cat([sincos_1d(cols.flatten(), dim // 2), sincos_1d(rows.flatten(), dim // 2)], dim=1)
    return emb.float()  # (N, dim)


def window_mask(grid_h: int, grid_w: int, window: int) -> torch.Tensor:
    """(N, N) bool, True where patches i and j lie in the same window×window window of the grid."""
    _check_int("window", window, 1)
    if grid_h % window or grid_w % window:
        raise ValueError(f"window={window} does not tile the {grid_h}x{grid_w} patch grid: use a divisor of both "
                         f"(SAM pads the grid instead)")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    wid = ((rows // window) * (grid_w // window) + cols // window).flatten()  # (N,) window id of each patch
    return wid[:, None] == wid[None, :]


@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 8
    in_chans: int = 3
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n_classes: int = 0  # 0: no classification head, forward returns the pooled feature
    window: int = 0  # 0: every block global; else window side in patches for the windowed blocks
    global_blocks: tuple = ()  # with window > 0: indices of the blocks that stay global
    pos: str = "sincos"  # or "learned" (ViT's own)
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_chans", "n_layer", "n_head", "n_embd"):
            _check_int(f"ViTConfig.{name}", getattr(self, name), 1)
        _check_int("ViTConfig.n_classes", self.n_classes, 0)
        _check_int("ViTConfig.window", self.window, 0)
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.image_size={self.image_size} is not divisible by "
                             f"ViTConfig.patch_size={self.patch_size}")
        if self.pos not in POSITIONS:
            raise ValueError(f"ViTConfig.pos must be one of {POSITIONS}, got {self.pos!r}")
        if self.pos == "sincos" and self.n_embd % 4:
            raise ValueError(f"ViTConfig.n_embd={self.n_embd} must be a multiple of 4 for sin-cos positions")
        self.global_blocks = tuple(self.global_blocks)
        bad = [i for i in self.global_blocks if not isinstance(i, int) or not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"ViTConfig.global_blocks holds {bad}, not block indices in [0, n_layer={self.n_layer})")
        if self.global_blocks and not self.window:
            raise ValueError("ViTConfig.global_blocks is only meaningful with window > 0 (all blocks are global)")
        if self.window and self.grid % self.window:
            raise ValueError(f"ViTConfig.window={self.window} does not tile the {self.grid}x{self.grid} patch grid")
        self.model_config()  # n_embd divisible by n_head, dropout range: ModelConfig's own checks

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def model_config(self) -> ModelConfig:
        """The shared blocks' config: a bidirectional encoder over N patch tokens."""
        return ModelConfig(vocab_size=1, block_size=self.num_patches, n_layer=self.n_layer, n_head=self.n_head,
                           n_embd=self.n_embd, dropout=self.dropout, causal=False)

    def replace(self, **kw) -> "ViTConfig":
        return ViTConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **kw})


class ViTBlock(Block):
    """The shared Block; a windowed one ANDs its fixed window mask into whatever mask it is given."""

    def __init__(self, config: ModelConfig, window_mask: torch.Tensor | None = None):
        super().__init__(config)
        self.register_buffer("window_mask", window_mask, persistent=False)  # (N, N) bool or None

    def forward(self, x, attn_mask=None):
        mask = self.window_mask
        if mask is None:
            mask = attn_mask
        elif attn_mask is not None:
            mask = mask & attn_mask
        return super().forward(x, mask)  # (B, N, C)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if not isinstance(cfg, ViTConfig):
            raise TypeError(f"cfg must be a ViTConfig, got {type(cfg).__name__}")
        self.config = cfg
        mc = cfg.model_config()
        P = cfg.patch_size
        self.patch_embed = nn.Linear(cfg.in_chans * P * P, cfg.n_embd)  # E in section 3.1, eq. 1
        pos = sincos_2d(cfg.grid, cfg.grid, cfg.n_embd) if cfg.pos == "sincos" else torch.zeros(cfg.num_patches, cfg.n_embd)
        if cfg.pos == "learned":
            self.pos_embed = nn.Parameter(pos.normal_(0.0, 0.02))
        else:
            self.register_buffer("pos_embed", pos, persistent=False)  # (N, C), fixed
        self.drop = nn.Dropout(cfg.dropout)
        wmask = window_mask(cfg.grid, cfg.grid, cfg.window) if cfg.window else None
        self.blocks = nn.ModuleList(
            ViTBlock(mc, None if (wmask is None or i in cfg.global_blocks) else wmask) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.n_classes) if cfg.n_classes else None
        self.runner = run_blocks  # the seam course.recompute replaces
        self.apply(Transformer._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def windowed(self) -> list[bool]:
        return [b.window_mask is not None for b in self.blocks]

    def features(self, images: torch.Tensor, attn_mask=None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch features after the final LayerNorm."""
        cfg = self.config
        check_images(images, cfg.in_chans, cfg.image_size)
        x = self.patch_embed(patchify(images, cfg.patch_size)) + self.pos_embed  # (B, N, D)
        x = self.runner(self.blocks, self.drop(x), attn_mask)  # (B, N, D)
        return self.ln_f(x)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, grid, grid): the features laid out on the patch grid (SAM's image embedding layout)."""
        x = self.features(images)  # (B, N, D)
        g = self.config.grid
        return x.transpose(1, 2).reshape(x.size(0), -1, g, g)

    def embed(self, images: torch.Tensor, attn_mask=None) -> torch.Tensor:
        """(B, D): global average of the patch features."""
        return self.features(images, attn_mask).mean(dim=1)

    def forward(self, images, targets=None, attn_mask=None):
        """-> (logits (B, n_classes), loss) with a head; (pooled (B, D), None) without one."""
        pooled = self.embed(images, attn_mask)
        if self.head is None:
            if targets is not None:
                raise ValueError("targets given but ViTConfig.n_classes=0: there is no classification head")
            return pooled, None
        logits = self.head(pooled)  # (B, n_classes)
        loss = None
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != (images.size(0),):
                raise ValueError(f"targets must be a (batch,) tensor of class ids, got "
                                 f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
            loss = F.cross_entropy(logits, targets)
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
