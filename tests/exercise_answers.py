"""Typical wrong answers to the exercises, each with a piece of the hint its checker must print.

WRONG[exercise id] = [(wrong function, expected hint text), ...]: at least two per exercise.
"""
import math

import torch
import torch.nn.functional as F

from course.data import CharTokenizer
from course.exercises import lesson05

WRONG: dict[str, list] = {}


def wrong(exercise_id: str, hint: str):
    def register(fn):
        WRONG.setdefault(exercise_id, []).append((fn, hint))
        return fn
    return register


# ----------------------------------------------------------------------------- 00 tour

@wrong("00.char_tokenizer", "ids 0-4 are reserved")
def tokenizer_from_zero(text):
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return (lambda s: [stoi.get(c, 1) for c in s]), (lambda ids: "".join(chars[i] for i in ids))


@wrong("00.char_tokenizer", "raised KeyError")
def tokenizer_without_unk(text):
    tok = CharTokenizer.train(text)
    return (lambda s: [tok.stoi[c] for c in s]), tok.decode


@wrong("00.char_tokenizer", "ids follow sorted(set(text))")
def tokenizer_in_order_of_appearance(text):
    chars = list(dict.fromkeys(text))
    stoi = {c: i + 5 for i, c in enumerate(chars)}
    return (lambda s: [stoi.get(c, 1) for c in s]), (lambda ids: "".join(chars[i - 5] for i in ids))


@wrong("00.next_token_targets", "x and y are swapped")
def targets_swapped(window):
    return window[:, 1:], window[:, :-1]


@wrong("00.next_token_targets", "y equals x")
def targets_not_shifted(window):
    return window[:, :-1], window[:, :-1]


@wrong("00.next_token_targets", "should have shape")
def targets_whole_window(window):
    return window, window.roll(-1, 1)


@wrong("00.tokens_per_step", "the factor grad_accum = 7 is missing")
def tokens_without_accumulation(batch_size, block_size, grad_accum=1, world=1):
    return batch_size * block_size * world


@wrong("00.tokens_per_step", "the factor world = 11 is missing")
def tokens_of_one_rank(batch_size, block_size, grad_accum=1, world=1):
    return batch_size * block_size * grad_accum


# ----------------------------------------------------------------------------- 01 attention

@wrong("01.causal_mask", "your mask lets token 0 see token 1")
def mask_upper(T):
    return torch.ones(T, T, dtype=torch.bool).triu()


@wrong("01.causal_mask", "a token must see itself")
def mask_strict(T):
    return torch.ones(T, T, dtype=torch.bool).tril(-1)


@wrong("01.causal_mask", "dtype torch.bool")
def mask_float(T):
    return torch.ones(T, T).tril()


@wrong("01.softmax", "overflows")
def softmax_naive(scores, dim=-1):
    e = scores.exp()
    return e / e.sum(dim, keepdim=True)


@wrong("01.softmax", "you normalised along dim")
def softmax_last_dim_only(scores, dim=-1):
    s = scores - scores.amax(-1, keepdim=True)
    return s.exp() / s.exp().sum(-1, keepdim=True)


@wrong("01.softmax", "changed its input in place")
def softmax_in_place(scores, dim=-1):
    scores -= scores.amax(dim, keepdim=True)
    scores.exp_()
    return scores / scores.sum(dim, keepdim=True)


@wrong("01.self_attention", "did not divide the scores by sqrt(d_k)")
def attention_unscaled(q, k, v, causal=False):
    s = q @ k.transpose(-2, -1)
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1) @ v


@wrong("01.self_attention", "with causal=True every query must ignore later keys")
def attention_ignores_causal(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v)


@wrong("01.self_attention", "softmax runs over the queries")
def attention_wrong_axis(q, k, v, causal=False):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-2).nan_to_num() @ v


# ----------------------------------------------------------------------------- 02 BERT vs GPT

def _select(x, tok, rate, generator):
    specials = torch.tensor(sorted(tok.special_ids))
    return ~torch.isin(x, specials) & (torch.rand(x.shape, generator=generator) < rate)


@wrong("02.mask_tokens", "became [MASK]")
def mask_everything_selected(x, tok, rate=0.15, generator=None):
    sel = _select(x, tok, rate, generator)
    return torch.where(sel, torch.full_like(x, tok.mask_id), x), torch.where(sel, x, torch.full_like(x, -100))


@wrong("02.mask_tokens", "labels must be -100")
def mask_labels_everywhere(x, tok, rate=0.15, generator=None):
    sel = _select(x, tok, rate, generator)
    return torch.where(sel, torch.full_like(x, tok.mask_id), x), x.clone()


@wrong("02.mask_tokens", "a special token ([CLS], [SEP] or [PAD]) was selected")
def mask_specials_too(x, tok, rate=0.15, generator=None):
    sel = torch.rand(x.shape, generator=generator) < rate
    act = torch.rand(x.shape, generator=generator)
    rnd = torch.randint(5, tok.vocab_size, x.shape, generator=generator)
    inputs = torch.where(sel & (act < 0.8), torch.full_like(x, tok.mask_id), x)
    inputs = torch.where(sel & (act >= 0.8) & (act < 0.9), rnd, inputs)
    return inputs, torch.where(sel, x, torch.full_like(x, -100))


@wrong("02.mask_tokens", "you selected")
def mask_fixed_rate(x, tok, rate=0.15, generator=None):
    from course.objectives import mask_tokens
    return mask_tokens(x, tok, 0.15, generator)  # ignores the rate argument


@wrong("02.mask_tokens", "draw every random number from `generator`")
def mask_ignores_generator(x, tok, rate=0.15, generator=None):
    from course.objectives import mask_tokens
    return mask_tokens(x, tok, rate, None)


@wrong("02.prefix_lm_mask", "hides key")
def prefix_causal_only(T, prefix_len):
    return torch.ones(T, T, dtype=torch.bool).tril()


@wrong("02.prefix_lm_mask", "lets query 0 see key")
def prefix_queries_see_everything(T, prefix_len):
    i = torch.arange(T)
    return (i[None, :] <= i[:, None]) | (i[None, :] < prefix_len) | (i[:, None] < prefix_len)


# ----------------------------------------------------------------------------- 03 sparse attention

@wrong("03.sliding_window_layout", "is missing, but query")
def window_diagonal_only(seq_len, window, block_size, causal=False):
    return torch.eye(math.ceil(seq_len / block_size), dtype=torch.bool)


@wrong("03.sliding_window_layout", "all its keys come after its queries")
def window_ignores_causal(seq_len, window, block_size, causal=False):
    from course.sparse.patterns import sliding_window
    return sliding_window(seq_len, window, block_size, causal=False).layout[0]


@wrong("03.bigbird_layout", "is a global block: it attends every block")
def bigbird_no_global_rows(n_blocks, window_blocks, global_blocks, random_blocks):
    idx = torch.arange(n_blocks)
    layout = (idx[:, None] - idx[None, :]).abs() <= window_blocks // 2
    layout[:, global_blocks] = True
    for i, cols in enumerate(random_blocks):
        layout[i, list(cols)] = True
    return layout


@wrong("03.bigbird_layout", "is one of random_blocks")
def bigbird_no_random(n_blocks, window_blocks, global_blocks, random_blocks):
    idx = torch.arange(n_blocks)
    layout = (idx[:, None] - idx[None, :]).abs() <= window_blocks // 2
    layout[global_blocks, :] = True
    layout[:, global_blocks] = True
    return layout


@wrong("03.strided_mask", "nor a multiple of it")
def strided_absolute_columns(T, stride):
    i = torch.arange(T)
    d = i[:, None] - i[None, :]
    return (d >= 0) & ((d <= stride) | (i[None, :] % stride == 0))  # j mod l, not (i - j) mod l


@wrong("03.strided_mask", "the pattern is causal")
def strided_both_sides(T, stride):
    i = torch.arange(T)
    d = (i[:, None] - i[None, :]).abs()
    return (d <= stride) | (d % stride == 0)


# ----------------------------------------------------------------------------- 04 recomputation

@wrong("04.sqrt_segments", "floor(sqrt n)")
def segments_floor(n):
    m = max(1, math.isqrt(n))
    return [(i, min(i + m, n)) for i in range(0, n, m)]


@wrong("04.sqrt_segments", "is in no segment")
def segments_inclusive_stop(n):
    m = math.ceil(math.sqrt(n))
    return [(i, min(i + m, n) - 1) for i in range(0, n, m)]


@wrong("04.block_bytes", "you are missing 16·s·b·h bytes (4·s·b·h fp32 elements)")
def bytes_without_gelu(s, b, h, a):
    return 4 * (12 * s * b * h + 4 * s * b + a * s * b)


@wrong("04.block_bytes", "the LayerNorm statistics")
def bytes_without_stats(s, b, h, a):
    return 4 * (16 * s * b * h + a * s * b)


@wrong("04.block_bytes", "fused attention (SDPA) keeps no s×s matrix")
def bytes_with_scores(s, b, h, a):
    return 4 * (16 * s * b * h + 4 * s * b + a * s * b + a * s * s * b)


@wrong("04.block_bytes", "elements, not bytes")
def bytes_as_elements(s, b, h, a):
    return 16 * s * b * h + 4 * s * b + a * s * b


def _plain(blocks, x, a, b):
    for i in range(a, b):
        x = blocks[i](x)
    return x


@wrong("04.run_segments", "so backward must recompute it")
def segments_never_checkpointed(blocks, x, segments):
    for a, b, _ in segments:
        x = _plain(blocks, x, a, b)
    return x


@wrong("04.run_segments", "is not checkpointed")
def segments_all_checkpointed(blocks, x, segments):
    from torch.utils.checkpoint import checkpoint
    for a, b, _ in segments:
        x = checkpoint(_plain, blocks, x, a, b, use_reentrant=False)
    return x


@wrong("04.run_segments", "block 2 ran 0 times")
def segments_skip_the_last(blocks, x, segments):
    for a, b, _ in segments[:-1]:
        x = _plain(blocks, x, a, b)
    return x


# ----------------------------------------------------------------------------- 05 data parallelism

@wrong("05.make_buckets", "walk the parameters in reverse")
def buckets_forward_order(params, cap_bytes):
    return lesson05._variant(list(params), cap_bytes, reverse=False)


@wrong("05.make_buckets", "size >= cap_bytes")
def buckets_strict(params, cap_bytes):
    return lesson05._variant(list(params), cap_bytes, strict=True)


@wrong("05.make_buckets", "p.numel() * p.element_size()")
def buckets_in_elements(params, cap_bytes):
    return lesson05._variant(list(params), cap_bytes, elements=True)


def _hooks(buckets, comm, per_parameter=False, divide=True, in_hook=True, reset=True, wait=True):
    """A configurable bucketed all-reduce, to build the typical mistakes."""
    groups = [[p] for b in buckets for p in b] if per_parameter else buckets
    where = {id(p): g for g, group in enumerate(groups) for p in group}
    ready, pending = [0] * len(groups), []

    def launch(g):
        flat = torch.cat([q.grad.flatten() for q in groups[g]])
        pending.append((g, flat, comm.all_reduce(flat, async_op=True)))

    def hook(p):
        g = where[id(p)]
        ready[g] += 1
        if in_hook and ready[g] == len(groups[g]):
            launch(g)
    for group in groups:
        for p in group:
            p.register_post_accumulate_grad_hook(hook)

    def finish():
        if not in_hook:
            for g in range(len(groups)):
                launch(g)
        for g, flat, work in pending:
            if wait:
                work.wait()
            if divide:
                flat /= comm.world
            for p, part in zip(groups[g], flat.split([q.numel() for q in groups[g]])):
                p.grad.copy_(part.view_as(p))
        if reset:
            pending.clear()
            ready[:] = [0] * len(groups)
    return finish


WRONG["05.bucketed_all_reduce"] = [
    (lambda buckets, comm: _hooks(buckets, comm, per_parameter=True), "one call per bucket"),
    (lambda buckets, comm: _hooks(buckets, comm, divide=False), "divide by comm.world"),
    (lambda buckets, comm: _hooks(buckets, comm, in_hook=False), "started after backward had finished"),
    (lambda buckets, comm: _hooks(buckets, comm, reset=False), "on the second step"),
    (lambda buckets, comm: _hooks(buckets, comm, wait=False), "Call work.wait()"),
]


@wrong("05.zero_bytes", "you shard ['optimizer state'], but stage 0 shards nothing")
def zero_stage_off_by_one(n_params, stage, world):
    return sum(b * n_params / (world if stage + 1 >= 3 - i else 1) for i, b in enumerate((2, 2, 12)))


@wrong("05.zero_bytes", "fp32 AdamW")
def zero_fp32(n_params, stage, world):
    return sum(b * n_params / (world if stage >= 3 - i else 1) for i, b in enumerate((4, 4, 8)))


@wrong("05.zero_bytes", "shards nothing (plain data parallelism)")
def zero_everything_sharded(n_params, stage, world):
    return 16 * n_params / world


# ----------------------------------------------------------------------------- 06 tensor parallelism

@wrong("06.column_parallel_linear", "a shape error")
def column_split_inputs(x, weight, bias, rank, world):
    return F.linear(x, weight.chunk(world, 1)[rank], bias.chunk(world, 0)[rank])


@wrong("06.column_parallel_linear", "you took every")
def column_strided(x, weight, bias, rank, world):
    return F.linear(x, weight[rank::world], bias[rank::world])


@wrong("06.column_parallel_linear", "the bias is missing")
def column_without_bias(x, weight, bias, rank, world):
    return F.linear(x, weight.chunk(world, 0)[rank])


@wrong("06.row_parallel_linear", "holds the bias")
def row_bias_everywhere(x_shard, weight, bias, rank, world):
    return F.linear(x_shard, weight.chunk(world, 1)[rank], bias)


@wrong("06.row_parallel_linear", "a shape error")
def row_split_outputs(x_shard, weight, bias, rank, world):
    return F.linear(x_shard, weight.chunk(world, 0)[rank])


@wrong("06.row_parallel_linear", "the bias is missing")
def row_without_bias(x_shard, weight, bias, rank, world):
    return F.linear(x_shard, weight.chunk(world, 1)[rank])


# ----------------------------------------------------------------------------- 07 pipeline parallelism

@wrong("07.one_f_one_b", "GPipe")
def gpipe_instead(n_stages, n_micro, stage):
    from course.exercises.lesson07 import gpipe
    return gpipe(n_stages, n_micro, stage)


@wrong("07.one_f_one_b", "forwards before its first backward")
def one_f_one_b_no_warmup(n_stages, n_micro, stage):
    out = []
    for i in range(n_micro):
        out += [("F", i), ("B", i)]
    return out


@wrong("07.one_f_one_b", "comes before its forward")
def one_f_one_b_backward_first(n_stages, n_micro, stage):
    out = []
    for i in range(n_micro):
        out += [("B", i), ("F", i)]
    return out


@wrong("07.bubble_fraction", "relative to the busy time")
def bubble_megatron(n_stages, n_micro):
    return (n_stages - 1) / n_micro


@wrong("07.bubble_fraction", "fills (p - 1 forward slots)")
def bubble_off_by_one(n_stages, n_micro):
    return n_stages / (n_micro + n_stages)


# ----------------------------------------------------------------------------- 08 3D parallelism

@wrong("08.rank_coords", "you let the FIRST dimension vary fastest")
def coords_column_major(rank, dims):
    out = {}
    for name, size in dims.items():
        out[name], rank = rank % size, rank // size
    return out


@wrong("08.rank_coords", "one coordinate per dimension")
def coords_as_list(rank, dims):
    from course.parallel.mesh import Mesh
    return list(Mesh(**dims).coords(rank).values())


@wrong("08.group_of", "does not contain rank")
def group_of_first_group(rank, dims, dim):
    from course.parallel.mesh import Mesh
    return Mesh(**dims).groups(dim)[0] if rank not in Mesh(**dims).groups(dim)[0] else Mesh(**dims).groups(dim)[-1]


@wrong("08.group_of", "a pipeline group has 2")
def group_of_whole_world(rank, dims, dim):
    return list(range(math.prod(dims.values())))


@wrong("08.tensor_inside_nodes", "can still cross a node boundary")
def tensor_small_enough(dims, gpus_per_node):
    return dims["tensor"] <= gpus_per_node  # ignores where the group's ranks are


@wrong("08.tensor_inside_nodes", "can still cross a node boundary")
def tensor_first_group_only(dims, gpus_per_node):
    from course.parallel.mesh import Mesh
    group = Mesh(**dims).groups("tensor")[0]
    return len({r // gpus_per_node for r in group}) == 1  # the first group can be fine while others straddle


# ----------------------------------------------------------------------------- 09 fault tolerance

def _save(path, model, optimizer, step, generator, keep=("model", "optimizer", "step", "generator")):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "generator": generator.get_state()}
    torch.save({k: v for k, v in state.items() if k in keep}, path)


def _load(path, model, optimizer, generator):
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if "generator" in state:
        generator.set_state(state["generator"])
    return state.get("step", 0)


WRONG["09.resume"] = [
    ((lambda *a: _save(*a, keep=("model", "step", "generator")), _load), "AdamW's state was not restored"),
    ((lambda *a: _save(*a, keep=("model", "optimizer", "step")), _load), "the data generator's state"),
    ((lambda *a: _save(*a, keep=("model", "optimizer", "generator")), _load), "it should return the saved step"),
    ((lambda *a: None, lambda *a: 3), "the model's weights differ from the saved ones"),
]


@wrong("09.clip_by_global_norm", "clipped each tensor by its own norm")
def clip_per_tensor(grads, max_norm):
    return [g * min(1.0, max_norm / g.norm().item()) for g in grads]


@wrong("09.clip_by_global_norm", "must stay unchanged")
def clip_always_rescale(grads, max_norm):
    norm = torch.cat([g.flatten() for g in grads]).norm()
    return [g * max_norm / norm for g in grads]


@wrong("09.clip_by_global_norm", "not the sum of the tensors' norms")
def clip_sum_of_norms(grads, max_norm):
    total = sum(g.norm().item() for g in grads)
    return [g * min(1.0, max_norm / total) for g in grads]


@wrong("09.lr_at", "step 0 already learns")
def lr_warmup_from_zero(step, lr, min_lr, warmup_steps, max_steps):
    from course.exercises.lesson09 import _lr_at
    return lr * step / warmup_steps if step < warmup_steps else _lr_at(step, lr, min_lr, warmup_steps, max_steps)


@wrong("09.lr_at", "half a cosine")
def lr_linear_decay(step, lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return lr - (lr - min_lr) * progress


# ----------------------------------------------------------------------------- 10 ViT / CLIP

@wrong("10.patchify", "a plain reshape")
def patchify_reshape(images, patch):
    B, C, H, W = images.shape
    return images.reshape(B, (H // patch) * (W // patch), C * patch * patch)


@wrong("10.patchify", "channel-last")
def patchify_channel_last(images, patch):
    B, C, H, W = images.shape
    g = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return g.permute(0, 2, 4, 3, 5, 1).reshape(B, -1, C * patch * patch)


@wrong("10.clip_loss", "normalise both embeddings")
def clip_unnormalised(image_emb, text_emb, temperature):
    logits = image_emb @ text_emb.T / temperature
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@wrong("10.clip_loss", "only the image -> text direction")
def clip_one_direction(image_emb, text_emb, temperature):
    logits = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits)))


@wrong("10.clip_loss", "multiplied by the temperature")
def clip_times_temperature(image_emb, text_emb, temperature):
    logits = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T * temperature
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ----------------------------------------------------------------------------- 11 flash attention

@wrong("11.online_softmax_stats", "the sum so far must be rescaled")
def stats_without_rescale(chunks):
    m, l = float("-inf"), 0.0
    for c in chunks:
        m = max(m, c.max().item())
        l += (c - m).exp().sum().item()
    return m, l


@wrong("11.online_softmax_stats", "start from m = -inf")
def stats_from_zero(chunks):
    m, l = 0.0, 0.0
    for c in chunks:
        m_new = max(m, c.max().item())
        l = l * math.exp(m - m_new) + (c - m_new).exp().sum().item()
        m = m_new
    return m, l


@wrong("11.online_attention", "multiply l and o by exp(m - m')")
def attention_without_rescale(q, k, v, block):
    from course.exercises.lesson11 import _online_attention
    return _online_attention(q, k, v, block, rescale=False)


@wrong("11.online_attention", "divide it by the running sum")
def attention_unnormalised(q, k, v, block):
    from course.exercises.lesson11 import _online_attention
    return _online_attention(q, k, v, block, divide=False)


@wrong("11.online_attention", "as large as the whole")
def attention_all_at_once(q, k, v, block):
    return torch.softmax(q @ k.T / math.sqrt(q.size(-1)), -1) @ v


# ----------------------------------------------------------------------------- other correct answers
# Written differently from the references: a checker must accept them (no overfitting to one spelling).

RIGHT: dict[str, list] = {}


def right(exercise_id: str):
    def register(fn):
        RIGHT.setdefault(exercise_id, []).append(fn)
        return fn
    return register


@right("00.char_tokenizer")
def tokenizer_by_hand(text):
    chars = sorted(set(text))
    stoi = {c: 5 + i for i, c in enumerate(chars)}
    return (lambda s: [stoi.get(c, 1) for c in s]), (lambda ids: "".join(chars[i - 5] for i in ids))


@right("01.causal_mask")
def mask_by_comparison(T):
    i = torch.arange(T)
    return i[:, None] >= i[None, :]


@right("01.softmax")
def softmax_by_logsumexp(scores, dim=-1):
    return (scores - scores.logsumexp(dim, keepdim=True)).exp()


@right("01.self_attention")
def attention_by_sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@right("02.mask_tokens")
def mask_by_bernoulli(x, tok, rate=0.15, generator=None):
    normal = ~torch.isin(x, torch.tensor(sorted(tok.special_ids)))
    selected = normal & torch.bernoulli(torch.full(x.shape, rate), generator=generator).bool()
    roll = torch.rand(x.shape, generator=generator)
    inputs = x.clone()
    inputs[selected & (roll < 0.8)] = tok.mask_id
    swap = selected & (roll >= 0.9)  # the other 10% keep their token
    inputs[swap] = torch.randint(5, tok.vocab_size, (int(swap.sum()),), generator=generator)
    return inputs, torch.where(selected, x, -100)


@right("03.sliding_window_layout")
def layout_from_elements(seq_len, window, block_size, causal=False):
    nb = math.ceil(seq_len / block_size)
    i = torch.arange(nb * block_size)
    d = i[:, None] - i[None, :]
    ok = (d.abs() <= window) & (i[:, None] < seq_len) & (i[None, :] < seq_len)
    if causal:
        ok &= d >= 0
    return ok.view(nb, block_size, nb, block_size).any(3).any(1)


@right("04.run_segments")
def segments_block_by_block(blocks, x, segments):
    from torch.utils.checkpoint import checkpoint
    for a, b, ckpt in segments:
        for i in range(a, b):  # a checkpointed segment may checkpoint each of its blocks: still recomputed once
            x = checkpoint(blocks[i], x, use_reentrant=False) if ckpt else blocks[i](x)
    return x


@right("05.bucketed_all_reduce")
def hooks_with_buffers(buckets, comm):
    return _hooks(buckets, comm)


@right("05.zero_bytes")
def zero_by_table(n_params, stage, world):
    return n_params * {0: 16, 1: 4 + 12 / world, 2: 2 + 14 / world, 3: 16 / world}[stage]


@right("06.column_parallel_linear")
def column_by_hand(x, weight, bias, rank, world):
    k = weight.size(0) // world
    return x @ weight[rank * k:(rank + 1) * k].T + bias[rank * k:(rank + 1) * k]


@right("07.one_f_one_b")
def one_f_one_b_by_counting(n_stages, n_micro, stage):
    out, f, b = [], 0, 0
    while b < n_micro:
        if f < n_micro and f - b < n_stages - stage:  # room for one more in flight
            out.append(("F", f))
            f += 1
        else:
            out.append(("B", b))
            b += 1
    return out


@right("09.resume")
def resume_in_two_files():
    def save(path, model, optimizer, step, generator):
        torch.save(model.state_dict(), path)
        torch.save((optimizer.state_dict(), step, generator.get_state()), path + ".rest")

    def load(path, model, optimizer, generator):
        model.load_state_dict(torch.load(path))
        opt, step, gen = torch.load(path + ".rest", weights_only=False)
        optimizer.load_state_dict(opt)
        generator.set_state(gen)
        return step
    return save, load


@right("10.clip_loss")
def clip_by_log_softmax(image_emb, text_emb, temperature):
    a = image_emb / image_emb.norm(dim=-1, keepdim=True)
    b = text_emb / text_emb.norm(dim=-1, keepdim=True)
    logits = a @ b.T / temperature
    return -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2


@right("11.online_attention")
def online_attention_normalised_each_step(q, k, v, block):
    T, d = q.shape
    m = torch.full((T, 1), float("-inf"), dtype=q.dtype)
    l = torch.zeros(T, 1, dtype=q.dtype)
    o = torch.zeros(T, v.size(1), dtype=q.dtype)
    for s in range(0, k.size(0), block):
        scores = q @ k[s:s + block].T / math.sqrt(d)
        m_new = torch.maximum(m, scores.amax(1, keepdim=True))
        p = (scores - m_new).exp()
        l_new = l * (m - m_new).exp() + p.sum(1, keepdim=True)
        o = (o * l * (m - m_new).exp() + p @ v[s:s + block]) / l_new  # o stays normalised
        m, l = m_new, l_new
    return o
