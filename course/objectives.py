"""Two objectives, one architecture: GPT's next-token prediction and BERT's masked-language modelling.

GPT (Radford et al. 2018, 2019): a causal decoder reads x_1..x_t and predicts x_{t+1};
    loss = -1/T sum_t log p(x_{t+1} | x_<=t)   (every position is a training signal).
BERT (Devlin et al. 2018, section 3.1 and appendix A.1): a bidirectional encoder sees the whole
    sequence with ~15% of the positions corrupted and predicts the original token only there:
    of the selected positions 80% become [MASK], 10% a random token, 10% stay unchanged, so the
    model cannot rely on [MASK] being present at fine-tuning time. Special tokens are never selected.
    loss = -1/|M| sum_{i in M} log p(x_i | x~)   (only ~15% of positions give a signal).
Prefix LM (UniLM, Dong et al. 2019; T5, Raffel et al. 2020, section 3.2): bidirectional attention
    inside a prefix, causal after it; the loss is on the part after the prefix. The bridge between both.

Evaluation helpers measure each model where it should win and where it should lose:
perplexity (next token, left context only), cloze accuracy (a blank with context on both sides),
generation (append-and-predict), and a linear probe on frozen features. Lesson 02's cloze items and
word statistics live in `course.lessons.bert_vs_gpt`.

Bidirectional models read [CLS] x [SEP] (as make_batch_fn('bert') trains them); the helpers add
the special tokens themselves, so every helper takes the same plain windows x for both models.
Tokenizer arguments are duck-typed: anything with vocab_size, pad_id, unk_id, cls_id, sep_id,
mask_id and special_ids (course.data's tokenizers, or a types.SimpleNamespace in tests).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OBJECTIVES = ("gpt", "bert", "prefix")  # next token / masked LM / prefix LM
CLOZE_METHODS = ("mask", "left", "rescore")


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
    return name


def _check_rate(rate: float) -> None:
    if not (isinstance(rate, (int, float)) and 0.0 < rate < 1.0):
        raise ValueError(f"rate (masking rate) must be in the open interval (0, 1), got {rate!r}")


# ----------------------------------------------------------------------------- GPT: causal LM

def causal_lm_targets(x: torch.Tensor, ignore: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T+1) -> inputs x[:, :-1] and targets x[:, 1:] (B, T): position t predicts token t+1.

    `ignore` (B, T+1) bool marks tokens that should not be predicted (e.g. padding): label -100."""
    if x.dim() != 2 or x.size(1) < 2:
        raise ValueError(f"x must be (B, T+1) with T+1 >= 2 tokens, got shape {tuple(x.shape)}")
    inputs, targets = x[:, :-1], x[:, 1:].clone()
    if ignore is not None:
        targets[ignore[:, 1:]] = -100
    return inputs, targets


def causal_lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal model on x (B, T+1)."""
    inputs, targets = causal_lm_targets(x)
    return model(inputs, targets)[1]


# ----------------------------------------------------------------------------- BERT: masked LM

def add_special_tokens(x: torch.Tensor, tok) -> torch.Tensor:
    """[CLS] x [SEP] for every row: (B, T) -> (B, T+2)."""
    B = x.size(0)
    cls = torch.full((B, 1), tok.cls_id, dtype=x.dtype, device=x.device)
    sep = torch.full((B, 1), tok.sep_id, dtype=x.dtype, device=x.device)
    return torch.cat([cls, x, sep], dim=1)


def mask_tokens(x: torch.Tensor, tok, rate: float = 0.15, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption. x (B, T) token ids -> (inputs, labels), both (B, T).

    Each non-special position is selected with probability `rate`; of the selected ones 80% are
    replaced by [MASK], 10% by a random non-special token, 10% left as they are. labels hold the
    original token at selected positions and -100 (ignored by the loss) everywhere else."""
    _check_rate(rate)
    specials = torch.tensor(sorted(tok.special_ids), device=x.device)
    candidates = ~torch.isin(x, specials)  # (B, T) positions that may be selected
    if not candidates.any():
        raise ValueError("mask_tokens: every token is a special token; nothing can be masked")
    u = torch.rand(x.shape, generator=generator, device=x.device)  # one draw decides select + action
    selected = candidates & (u < rate)
    action = torch.rand(x.shape, generator=generator, device=x.device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)  # the remaining 10% keep their token
    normal = torch.tensor([i for i in range(tok.vocab_size) if i not in tok.special_ids], device=x.device)
    random_ids = normal[torch.randint(len(normal), x.shape, generator=generator, device=x.device)]
    inputs = torch.where(to_mask, torch.full_like(x, tok.mask_id), x)
    inputs = torch.where(to_random, random_ids, inputs)
    labels = torch.where(selected, x, torch.full_like(x, -100))
    return inputs, labels


def mlm_loss(model, x: torch.Tensor, tok, rate: float = 0.15, generator=None) -> torch.Tensor:
    """Masked-LM cross-entropy of a bidirectional model on x (B, T), on the selected positions only."""
    inputs, labels = mask_tokens(x, tok, rate, generator)
    return model(inputs, labels)[1]


# ----------------------------------------------------------------------------- prefix LM

def prefix_lm_mask(T: int, prefix_len, device=None) -> torch.Tensor:
    """Boolean attention mask, True = may attend: query i sees key j if j <= i or j < prefix_len.

    prefix_len an int -> (T, T); a (B,) tensor -> (B, 1, T, T), one prefix per row.
    prefix_len=0 gives the causal triangle, prefix_len=T full bidirectional attention.
    Use it with a model built with causal=False (a causal model ANDs it with the triangle)."""
    if T <= 0:
        raise ValueError(f"T must be a positive integer, got {T}")
    p = torch.as_tensor(prefix_len, device=device)
    if ((p < 0) | (p > T)).any():
        raise ValueError(f"prefix_len must be in [0, T={T}], got {prefix_len}")
    i = torch.arange(T, device=device)
    causal = i[None, :] <= i[:, None]  # (T, T): key j <= query i
    if p.dim() == 0:
        return causal | (i[None, :] < p)
    return causal | (i[None, None, None, :] < p[:, None, None, None])  # (B, 1, T, T)


def prefix_lm_targets(y: torch.Tensor, prefix_len) -> torch.Tensor:
    """Next-token targets y (B, T) with the loss removed inside the prefix.

    Position t predicts token t+1; inside the prefix that token is visible to position t
    (bidirectional), so only positions t >= prefix_len - 1 keep their target."""
    T = y.size(1)
    p = torch.as_tensor(prefix_len, device=y.device).reshape(-1, 1)  # (B or 1, 1)
    if ((p < 0) | (p > T)).any():  # a longer prefix would leave no target at all (a NaN loss)
        raise ValueError(f"prefix_len must be in [0, T={T}], got {prefix_len}")
    t = torch.arange(T, device=y.device)
    return torch.where(t[None, :] >= p - 1, y, torch.full_like(y, -100))


# ----------------------------------------------------------------------------- one budget, two models

def paired_configs(config) -> tuple:
    """GPT and BERT configs with identical parameters: same sizes, both with BERT's MLM head
    transform (dense C*C+C, LayerNorm 2C). Only the attention mask (and the objective) differs,
    so parameter count and FLOPs per token are equal by construction."""
    return config.replace(causal=True, mlm_head=True), config.replace(causal=False, mlm_head=True)


# ----------------------------------------------------------------------------- batches for training

def make_batch_fn(objective: str, data, batch_size: int, block_size: int, rate: float = 0.15,
                  generator: torch.Generator | None = None, device=None):
    """A `batch_fn(split)` for course.train.train returning (x, y) or (x, y, attn_mask).

    Every objective reads the same windows of `block_size` tokens, so both models see the same
    number of tokens per step (same compute). BERT's windows are [CLS] + block_size-2 tokens + [SEP]."""
    check_objective(objective)
    if len(data.train) == 0:
        raise ValueError("the training corpus is empty: make_batch_fn needs at least block_size+2 tokens")
    tok = data.tokenizer
    n_special = 2  # [CLS], [SEP]
    if objective == "bert" and block_size <= n_special:
        raise ValueError(f"block_size must exceed the {n_special} special tokens [CLS] and [SEP] "
                         f"for objective 'bert', got {block_size}")
    if objective == "bert":
        _check_rate(rate)

    def batch_fn(split: str):
        if objective == "gpt":
            return data.batch(split, batch_size, block_size, generator=generator, device=device)
        if objective == "bert":
            x, _ = data.batch(split, batch_size, block_size - n_special, generator=generator)
            inputs, labels = mask_tokens(add_special_tokens(x, tok), tok, rate, generator)
            return _to(inputs, device), _to(labels, device)
        x, y = data.batch(split, batch_size, block_size, generator=generator)  # prefix LM
        p = torch.randint(1, block_size, (batch_size,), generator=generator)  # (B,) prefix lengths
        return _to(x, device), _to(prefix_lm_targets(y, p), device), _to(prefix_lm_mask(block_size, p), device)

    return batch_fn


def _to(t, device):
    return t if device is None else t.to(device)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def perplexity(model, x: torch.Tensor, tok=None, chunk: int = 256) -> float:
    """exp(mean next-token cross-entropy) on windows x (B, T+1), predicting tokens 1..T from the
    left context only.

    A causal model does it in one pass. A bidirectional model (tok required) is asked the same
    question the fair way: for each t it sees x_0..x_{t-1} followed by [MASK] at t, and nothing to
    the right (a key mask hides positions > t). That is B*T forward rows, processed in chunks."""
    model.eval()
    if model.config.causal:
        inputs, targets = causal_lm_targets(x)
        return math.exp(model(inputs, targets)[1].item())
    if tok is None:
        raise ValueError("perplexity of a bidirectional model needs tok (for the [MASK] id)")
    B, T1 = x.shape
    wrapped = add_special_tokens(x, tok)  # (B, T+3): [CLS] x [SEP]; token t sits at t+1
    rows, pos = [], []
    for t in range(1, T1):  # predict x[:, t] from [CLS] x[:, :t]
        r = wrapped.clone()
        r[:, t + 1] = tok.mask_id
        rows.append(r)
        pos.append(torch.full((B,), t + 1))
    rows, pos = torch.cat(rows), torch.cat(pos).to(x.device)  # (B*T, T+3), (B*T,)
    answers = x[:, 1:].T.reshape(-1)  # row order matches: t outer, b inner
    keys = torch.arange(wrapped.size(1), device=x.device)
    nll = []
    for s in range(0, len(rows), chunk):
        r, p = rows[s:s + chunk], pos[s:s + chunk]
        attn = (keys[None, :] <= p[:, None])[:, None, None, :]  # (b, 1, 1, T+3): nothing right of the blank
        logits = model(r, attn_mask=attn)[0]  # (b, T+3, V)
        picked = logits[torch.arange(len(r)), p]  # (b, V)
        nll.append(F.cross_entropy(picked, answers[s:s + chunk], reduction="none"))
    return math.exp(torch.cat(nll).mean().item())


@torch.no_grad()
def masked_token_accuracy(model, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the labelled positions (labels != -100) whose argmax prediction is the label."""
    model.eval()
    sel = labels != -100
    if not sel.any():
        raise ValueError("masked_token_accuracy: labels has no position to score (all -100)")
    logits = model(inputs)[0]
    return (logits.argmax(-1)[sel] == labels[sel]).float().mean().item()


@torch.no_grad()
def cloze_scores(model, x: torch.Tensor, pos: torch.Tensor, candidates: torch.Tensor, method: str,
                 tok=None) -> torch.Tensor:
    """Score K candidate tokens for one blank per row. x (N, T), pos (N,), candidates (N, K) -> (N, K).

    method:
      'mask'    (BERT) put [MASK] at the blank, one pass, read log p(candidate) there: both sides seen;
      'left'    (GPT, one pass) log p(candidate | tokens left of the blank): the right side is unseen;
      'rescore' (GPT, K passes) fill the blank with each candidate and add the log-probability of the
                candidate and every token after it: the right side is seen, through the likelihood."""
    if method not in CLOZE_METHODS:
        raise ValueError(f"method must be one of {CLOZE_METHODS}, got {method!r}")
    if ((pos < 1) | (pos >= x.size(1))).any():
        raise ValueError("pos must be in [1, T): the blank needs at least one token on its left")
    model.eval()
    rows = torch.arange(x.size(0), device=x.device)
    if method == "mask":
        if tok is None:
            raise ValueError("cloze method 'mask' needs tok (for the [MASK] id)")
        masked = add_special_tokens(x, tok)  # [CLS] x [SEP], as BERT was trained: blank moves to pos+1
        masked[rows, pos + 1] = tok.mask_id
        logp = model(masked)[0][rows, pos + 1].log_softmax(-1)  # (N, V)
        return logp.gather(1, candidates)
    if method == "left":
        logp = model(x)[0][rows, pos - 1].log_softmax(-1)  # (N, V) the position before predicts the blank
        return logp.gather(1, candidates)
    scores = []
    t = torch.arange(1, x.size(1), device=x.device)
    for k in range(candidates.size(1)):
        filled = x.clone()
        filled[rows, pos] = candidates[:, k]
        logp = model(filled[:, :-1])[0].log_softmax(-1)  # (N, T-1, V)
        tok_logp = logp.gather(2, filled[:, 1:, None])[..., 0]  # (N, T-1): log p(x_t | x_<t)
        scores.append((tok_logp * (t[None, :] >= pos[:, None])).sum(1))  # tokens left of the blank: same for all k
    return torch.stack(scores, 1)


def cloze_accuracy(model, x, pos, candidates, answer, method: str, tok=None) -> float:
    """Share of rows where the best-scored candidate is candidates[row, answer[row]]."""
    scores = cloze_scores(model, x, pos, candidates, method, tok)
    return (scores.argmax(1) == answer).float().mean().item()


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, tok=None, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue idx (B, T). GPT: Transformer.generate. BERT (tok required): append [MASK], predict
    it from everything on its left, write the prediction in, repeat -- the same question GPT answers."""
    if model.config.causal:
        model.eval()
        return model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    if tok is None:
        raise ValueError("generating with a bidirectional model needs tok (for the [MASK] id)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.eval()
    for _ in range(max_new_tokens):
        ctx = idx[:, -(model.config.block_size - 2):]
        ctx = torch.cat([torch.full_like(ctx[:, :1], tok.cls_id), ctx,
                         torch.full_like(ctx[:, :1], tok.mask_id)], 1)  # (B, T+2): [CLS] ctx [MASK]
        logits = model(ctx)[0][:, -1]  # (B, V)
        logits[:, sorted(tok.special_ids)] = float("-inf")  # never emit [MASK], [PAD], ...
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
        idx = torch.cat([idx, nxt], 1)
    return idx


# ----------------------------------------------------------------------------- linear probe

@torch.no_grad()
def features(model, x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """Frozen final-layer features of x (N, T): pool 'mean' over positions, 'last' or 'first' token -> (N, C)."""
    if pool not in ("mean", "last", "first"):
        raise ValueError(f"pool must be 'mean', 'last' or 'first', got {pool!r}")
    model.eval()
    h = model.hidden_states(x)  # (N, T, C)
    return {"mean": lambda: h.mean(1), "last": lambda: h[:, -1], "first": lambda: h[:, 0]}[pool]()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 ridge: float = 1.0) -> float:
    """Fit a linear classifier on frozen features (N, C) -> labels (N,); return test accuracy.

    Ridge regression onto one-hot labels, solved in closed form (no training loop, deterministic):
    W = (X^T X + ridge*I)^-1 X^T Y on standardised features with a bias column; predict argmax X W."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("linear_probe needs non-empty training and test features")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    ones = lambda n: torch.ones(n, 1, dtype=torch.float64)
    tr = torch.cat([((train_x - mu) / sd).double(), ones(len(train_x))], 1)  # (N, C+1)
    te = torch.cat([((test_x - mu) / sd).double(), ones(len(test_x))], 1)
    n_class = int(max(train_y.max(), test_y.max())) + 1
    Y = F.one_hot(train_y, n_class).double()  # (N, K)
    W = torch.linalg.solve(tr.T @ tr + ridge * torch.eye(tr.size(1), dtype=torch.float64), tr.T @ Y)  # (C+1, K)
    return (te @ W).argmax(1).eq(test_y).float().mean().item()
