"""Lesson 01 (attention): the O(T^2) cost measured, and tools to look inside trained heads.

- `score_matrix_cost` + `loglog_slope`: time and bytes of the score matrix per length (the n^2 curve);
- `head_stats` / `describe_heads`: what each head does, judged against a uniform causal head;
- `explore_attention`: the explorer widget's logic as a plain function (widgets swallow errors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import self_attention
from ..measure import time_it
from ..model import attention_maps, causal_mask


# ----------------------------------------------------------------------------- the O(T^2) cost

def score_matrix_cost(seq_lens, n_head: int = 4, head_dim: int = 32, batch: int = 1, repeats: int = 5,
                      device=None, dtype: torch.dtype = torch.float32, seed: int = 0,
                      cpu_threads: int | None = 1) -> list[dict]:
    """Time one from-scratch attention forward and count the bytes of its score matrix per length.

    Returns one row per T: {"T", "seconds" (course.measure.time_it: min of `repeats`), "score_bytes" (B*nh*T*T*itemsize)}.
    On CPU it times with `cpu_threads` threads (restored afterwards; None keeps torch's setting):
    one thread shows the algorithm's scaling without thread-pool start-up costs at small T, and is
    far less disturbed when other programs share the cores.
    """
    seq_lens = list(seq_lens)
    if not seq_lens or any(not isinstance(t, int) or t <= 0 for t in seq_lens):
        raise ValueError(f"seq_lens must be a non-empty list of positive integers, got {seq_lens!r}")
    if repeats <= 0:
        raise ValueError(f"repeats must be a positive integer, got {repeats}")
    device = torch.device(device or "cpu")
    g = torch.Generator(device="cpu").manual_seed(seed)
    saved_threads = torch.get_num_threads()
    if device.type == "cpu" and cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    try:
        return [_time_one(T, n_head, head_dim, batch, repeats, device, dtype, g) for T in seq_lens]
    finally:
        torch.set_num_threads(saved_threads)


def _time_one(T, n_head, head_dim, batch, repeats, device, dtype, g) -> dict:
    q, k, v = (torch.randn(batch, n_head, T, head_dim, generator=g).to(device, dtype) for _ in range(3))
    with torch.no_grad():
        seconds = time_it(lambda: self_attention(q, k, v, causal=True), repeats=repeats, device=device)
        _, w = self_attention(q, k, v, causal=True)  # w: (B, nh, T, T)
    return {"T": T, "seconds": seconds, "score_bytes": w.numel() * w.element_size()}


def loglog_slope(x, y) -> tuple[float, float]:
    """Least-squares fit of log y = slope * log x + intercept. Returns (slope, intercept)."""
    lx = torch.log(torch.as_tensor(x, dtype=torch.float64))
    ly = torch.log(torch.as_tensor(y, dtype=torch.float64))
    if lx.numel() < 2 or lx.shape != ly.shape:
        raise ValueError(f"x and y need the same length >= 2, got {lx.numel()} and {ly.numel()}")
    A = torch.stack([lx, torch.ones_like(lx)], dim=1)  # (n, 2)
    sol = torch.linalg.lstsq(A, ly[:, None]).solution  # (2, 1)
    return float(sol[0, 0]), float(sol[1, 0])


# ----------------------------------------------------------------------------- what heads do

def head_stats(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head summaries of attention maps (L, H, T, T) (batch averaged if (L, B, H, T, T)).

    Each is (L, H), averaged over query positions 1..T-1 (query 0 can only see itself in a GPT):
    - prev: weight on the previous token (j = i - 1)
    - self: weight on itself (j = i)
    - first: weight on the first token (j = 0)
    - distance: mean look-back i - j, weighted by attention
    - entropy: in nats; the uniform causal row has log(i + 1)
    """
    m = torch.as_tensor(maps).float()
    if m.dim() == 5:
        m = m.mean(dim=1)  # (L, H, T, T)
    if m.dim() != 4 or m.size(-1) != m.size(-2) or m.size(-1) < 2:
        raise ValueError(f"maps must be (L, H, T, T) or (L, B, H, T, T) with T >= 2, got {tuple(m.shape)}")
    T = m.size(-1)
    i = torch.arange(T)
    rows = slice(1, T)
    dist = (i[:, None] - i[None, :]).float()  # (T, T): i - j
    ent = -(m * m.clamp_min(1e-12).log()).sum(-1)  # (L, H, T)
    return {
        "prev": m[..., i[1:], i[:-1]].mean(-1),
        "self": m.diagonal(dim1=-2, dim2=-1)[..., rows].mean(-1),
        "first": m[..., rows, 0].mean(-1),
        "distance": (m * dist).sum(-1)[..., rows].mean(-1),
        "entropy": ent[..., rows].mean(-1),
    }


def _uniform_causal(T: int) -> torch.Tensor:
    """(1, 1, T, T): every query spreads its weight evenly over the keys it may see."""
    mask = causal_mask(T).float()
    return (mask / mask.sum(-1, keepdim=True))[None, None]


def describe_heads(maps: torch.Tensor, strong: float = 0.4, lean: float = 1.5) -> list[str]:
    """One plain-English line per causal head from `head_stats`, judged against a uniform causal head.

    A head is a previous-token / self / first-token head when it puts >= `strong` of its weight
    there; it "leans" that way when it puts >= `lean` times the uniform head's weight there;
    it is sharp by content when its entropy is under 60 % of the uniform head's without any of
    those positional preferences, and local when its mean look-back is under 60 % of uniform's.
    """
    s = head_stats(maps)
    u = {k: float(v) for k, v in head_stats(_uniform_causal(torch.as_tensor(maps).size(-1))).items()}
    names = {"prev": "previous-token", "self": "self / current-token", "first": "first-token"}
    short = {"prev": "previous", "self": "current", "first": "first"}
    L, H = s["prev"].shape
    lines = []
    for l in range(L):
        for h in range(H):
            v = {k: float(s[k][l, h]) for k in s}
            ratio = {k: v[k] / u[k] for k in names}
            top = max(names, key=lambda k: ratio[k])
            if v[top] >= strong:
                kind = f"{names[top]} head"
            elif ratio[top] >= lean:
                kind = f"leans to the {short[top]} token ({ratio[top]:.1f}x uniform)"
            elif v["entropy"] < 0.6 * u["entropy"]:
                kind = "sharp but not positional (picks by content)"
            elif v["distance"] < 0.6 * u["distance"]:
                kind = "local (looks a few tokens back)"
            else:
                kind = "broad (mixes context from far back)"
            lines.append(f"layer {l} head {h}: {kind:<42} prev {v['prev']:.2f} self {v['self']:.2f} "
                         f"first {v['first']:.2f} look-back {v['distance']:4.1f} entropy {v['entropy']:.2f}")
    return lines


@dataclass
class AttentionView:
    """What `explore_attention` computed: tokens, one head's (T, T) weights, and the axes drawn on."""
    tokens: list[str]
    weights: torch.Tensor  # (T, T)
    layer: int
    head: int
    ax: object = None

    def strongest(self) -> list[tuple[str, str, float]]:
        """For each query token: (query, the key it attends most, that weight)."""
        top = self.weights.max(dim=-1)
        return [(self.tokens[i], self.tokens[int(j)], float(w))
                for i, (w, j) in enumerate(zip(top.values, top.indices))]


def explore_attention(model, tokenizer, text: str, layer: int, head: int, ax=None,
                      plot: bool = True) -> AttentionView:
    """Attention weights of one (layer, head) of `model` on `text`, drawn as a heatmap.

    The logic behind lesson 01's widget; plot=False returns the data without drawing.
    """
    n_layer, n_head = model.config.n_layer, model.config.n_head
    if not isinstance(layer, int) or not 0 <= layer < n_layer:
        raise ValueError(f"layer must be an integer in [0, {n_layer - 1}], got {layer!r}")
    if not isinstance(head, int) or not 0 <= head < n_head:
        raise ValueError(f"head must be an integer in [0, {n_head - 1}], got {head!r}")
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    ids = tokenizer.encode(text)
    if len(ids) > model.config.block_size:
        raise ValueError(f"text is {len(ids)} tokens, longer than the model's block_size "
                         f"{model.config.block_size}")
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    weights = attention_maps(model, idx)[layer, 0, head].cpu()  # (T, T)
    tokens = [tokenizer.decode([i]) for i in ids]
    view = AttentionView(tokens, weights, layer, head)
    if plot:
        from ..viz import plot_attention
        view.ax = plot_attention(weights, tokens, ax=ax, title=f"layer {layer}, head {head}")
    return view


def plot_cost_scaling(rows: list[dict], n_head: int):
    """Measured forward time and score-matrix bytes against T (log-log) with T² guides; returns
    (figure, fitted time slope, fitted bytes slope)."""
    import matplotlib.pyplot as plt
    Ts = [r["T"] for r in rows]
    secs = [r["seconds"] for r in rows]
    nbytes = [r["score_bytes"] for r in rows]
    time_slope, _ = loglog_slope(Ts, secs)
    byte_slope, _ = loglog_slope(Ts, nbytes)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.loglog(Ts, secs, "o-", label=f"measured (fitted slope {time_slope:.2f})")
    ax1.loglog(Ts, [secs[-1] * (t / Ts[-1]) ** 2 for t in Ts], "k--", alpha=0.6, label="∝ T² through the largest T")
    ax1.set(xlabel="sequence length T (tokens)", ylabel="forward time (s)", title="time of one attention forward")
    ax2.loglog(Ts, [b / 2**20 for b in nbytes], "o-", color="C1", label=f"measured (slope {byte_slope:.2f})")
    ax2.loglog(Ts, [nbytes[0] / 2**20 * (t / Ts[0]) ** 2 for t in Ts], "k--", alpha=0.6, label="∝ T²")
    itemsize = nbytes[0] // (n_head * Ts[0] ** 2)
    ax2.set(xlabel="sequence length T (tokens)", ylabel="score matrix size (MiB)",
            title=f"1 sequence × {n_head} heads × T × T × {itemsize} bytes")
    for ax in (ax1, ax2):
        ax.set_xticks(Ts, [f"{t:,}" for t in Ts])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    return fig, time_slope, byte_slope


def attention_explorer(model, tokenizer, sentences, n_layer: int, n_head: int):
    """The lesson's ipywidgets explorer around explore_attention (layer, head, sentence)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    def show(layer, head, text):
        explore_attention(model, tokenizer, text, layer, head, ax=plt.subplots(figsize=(6, 5.5))[1])
        plt.show()
    return widgets.interactive(show, layer=widgets.IntSlider(0, 0, n_layer - 1),
                               head=widgets.IntSlider(0, 0, n_head - 1), text=widgets.Dropdown(options=sentences))
