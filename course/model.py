"""One small transformer that is both a GPT (causal decoder) and a BERT (bidirectional encoder).

Layout follows GPT-2 (Radford et al. 2019) as nanoGPT writes it: pre-LayerNorm blocks,
learned position embeddings, GELU MLP of width 4C, tied input/output embeddings, and
residual projections initialised with std 0.02/sqrt(2*n_layer). BERT (Devlin et al. 2018)
differs only in the attention mask (none) and an MLM head transform (dense, GELU, LayerNorm)
before the tied decoder; `ModelConfig.bert()` switches both.

The model knows nothing about sparsity, recomputation or parallelism. Later chapters plug in
from the outside (`course.parallelize` applies them in one documented order):
- parts of the same shape: every block's `attn.core` is a module `core(q, k, v, causal, attn_mask,
  dropout_p)` (swap it with `set_attention(model, make_core)`: sparse attention, recording weights);
  the linear layers can be replaced by parallel ones with the same call; `blocks[i](x, attn_mask)`
  stays a block (hooks may be added to it, as FSDP does);
- one seam for running the blocks: `model.runner(blocks, x, attn_mask)`, by default `run_blocks`
  (every block in order). Recomputation installs a runner that runs segments of several blocks
  under one checkpoint (sqrt(n), every-k) without changing `model.blocks`.

Masks: `attn_mask` is boolean, True where a query may attend a key, broadcastable to
(B, n_head, T, T). With a causal model it is combined (AND) with the causal triangle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .costs import flops_per_token


@dataclass
class ModelConfig:
    vocab_size: int = 256
    block_size: int = 128  # longest sequence the position table holds
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    causal: bool = True  # GPT: True; BERT: False
    mlm_head: bool = False  # BERT's dense + GELU + LayerNorm before the decoder

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"ModelConfig.n_embd ({self.n_embd}) must be divisible by "
                             f"ModelConfig.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def gpt(cls, **kw) -> "ModelConfig":
        return cls(**{"causal": True, "mlm_head": False, **kw})

    @classmethod
    def bert(cls, **kw) -> "ModelConfig":
        return cls(**{"causal": False, "mlm_head": True, **kw})

    @classmethod
    def from_profile(cls, prof, vocab_size: int, **kw) -> "ModelConfig":
        """Sizes from a `course.device.Profile`."""
        sizes = dict(n_layer=prof.n_layer, n_head=prof.n_head, n_embd=prof.n_embd,
                     block_size=prof.block_size, vocab_size=vocab_size)
        return cls(**{**sizes, **kw})

    def replace(self, **kw) -> "ModelConfig":
        return ModelConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **kw})


def causal_mask(T: int, S: int | None = None, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i may attend key j: j <= i (+ S - T when keys are longer).
    The one place the course builds the causal triangle."""
    S = T if S is None else S
    for name, v in (("T", T), ("S", S)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def _combine_masks(T: int, S: int, causal: bool, attn_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """One boolean mask (True = attend) from the causal flag and an optional user mask."""
    if not causal:
        return attn_mask
    tri = causal_mask(T, S, device)  # (T, S)
    return tri if attn_mask is None else attn_mask & tri


def run_blocks(blocks, x, attn_mask=None):
    """The default runner: every block in order. x (B, T, C) -> (B, T, C)."""
    for block in blocks:
        x = block(x, attn_mask)
    return x


def check_tokens(idx, vocab_size: int, name: str = "idx") -> None:
    """ValueError/TypeError unless idx is a (B, T) integer tensor of ids in [0, vocab_size).
    The range is checked for CPU tensors (on a GPU it would cost a sync per step; CUDA's
    embedding then stops with a device-side assert instead of a silent wrong result)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{name} must be (batch, seq_len), got shape {tuple(idx.shape)}; "
                         f"add a batch dimension with {name}[None] for one sequence")
    if idx.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(idx.shape)}): need at least one token")
    if idx.device.type == "cpu":
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} holds token ids in [{lo}, {hi}], outside [0, vocab_size={vocab_size})")


def _check_mask(mask, B: int, H: int, T: int) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a bool tensor (True = may attend), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    try:
        torch.broadcast_shapes(mask.shape, (B, H, T, T))
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, T, T) = "
                         f"{(B, H, T, T)}") from None
    if mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dims (batch, heads, T, T), got {tuple(mask.shape)}")


class SDPAttention(nn.Module):
    """Fast path: PyTorch's fused scaled_dot_product_attention (never forms weights we can see)."""

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        # q, k, v: (B, nh, T, hs)
        if attn_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        mask = _combine_masks(q.size(-2), k.size(-2), causal, attn_mask, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MatmulAttention(nn.Module):
    """Attention written out: softmax(q k^T / sqrt(hs)) v. Keeps the weights when asked."""

    def __init__(self, keep_weights: bool = False):
        super().__init__()
        self.keep_weights = keep_weights
        self.weights: torch.Tensor | None = None

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
        mask = _combine_masks(q.size(-2), k.size(-2), causal, attn_mask, q.device)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        if self.keep_weights:
            self.weights = att.detach()
        att = F.dropout(att, p=dropout_p, training=dropout_p > 0)
        return att @ v  # (B, nh, T, hs)

    def extra_repr(self) -> str:
        return f"keep_weights={self.keep_weights}"


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.causal = config.causal
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.core: nn.Module = SDPAttention()

    def forward(self, x, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = self.core(q, k, v, causal=self.causal, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """GPT or BERT, by `config.causal` / `config.mlm_head`. forward -> (logits, loss or None)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head_transform = (nn.Sequential(nn.Linear(config.n_embd, config.n_embd),
                                             nn.GELU(approximate="tanh"), nn.LayerNorm(config.n_embd))
                               if config.mlm_head else nn.Identity())
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.runner = run_blocks  # the seam for running the blocks (a plain callable, not a module)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: GPT-2's 1/sqrt(2L) scaling
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, attn_mask=None):
        """Final-layer features after ln_f: (B, T, C). Used for linear probes."""
        check_tokens(idx, self.config.vocab_size)
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds ModelConfig.block_size={self.config.block_size}")
        if attn_mask is not None:
            _check_mask(attn_mask, B, self.config.n_head, T)
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        x = self.runner(self.blocks, x, attn_mask)  # (B, T, C)
        return self.ln_f(x)

    def forward(self, idx, targets=None, attn_mask=None):
        """idx (B, T) token ids; targets (B, T) with -100 where no loss is wanted."""
        logits = self.lm_head(self.head_transform(self.hidden_states(idx, attn_mask)))  # (B, T, V)
        loss = None
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
                raise ValueError(f"targets must be a tensor of the same shape as idx {tuple(idx.shape)}, got "
                                 f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (token ones are tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the weights + 12·L·C·T for attention (PaLM appendix B)."""
        c = self.config
        return flops_per_token(self.num_params(), c.n_layer, c.n_embd, seq_len or c.block_size)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """Sample continuations of idx (B, T). temperature=0 means greedy."""
        if not self.config.causal:
            raise ValueError("generate() needs a causal model (ModelConfig.causal=True)")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        check_tokens(idx, self.config.vocab_size)
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :]  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


def attention_layers(model: nn.Module) -> list[SelfAttention]:
    """Every SelfAttention in the model, in order (works through wrappers)."""
    return [m for m in model.modules() if isinstance(m, SelfAttention)]


def set_attention(model: nn.Module, make_core: Callable[[int], nn.Module]) -> nn.Module:
    """Give layer i the attention core `make_core(i)`. Returns the model."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError("set_attention: model has no SelfAttention layers")
    for i, layer in enumerate(layers):
        layer.core = make_core(i)
    return model


@torch.no_grad()
def attention_maps(model: nn.Module, idx: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """Attention weights of every layer: (n_layer, B, n_head, T, T), computed with MatmulAttention.

    The model's own cores are put back afterwards (dense weights: for sparse cores the
    mask is whatever the sparse core would apply only if it is passed as attn_mask).
    """
    layers = attention_layers(model)
    saved = [layer.core for layer in layers]
    was_training = model.training
    try:
        model.eval()
        set_attention(model, lambda i: MatmulAttention(keep_weights=True))
        model(idx, attn_mask=attn_mask)
        return torch.stack([layer.core.weights for layer in layers])
    finally:
        for layer, core in zip(layers, saved):
            layer.core = core
        model.train(was_training)
