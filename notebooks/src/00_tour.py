# %% [markdown]
# # 00 · A tour: how GPT-3-scale transformers are trained, one technique at a time
#
# GPT-3 (Brown et al. 2020) is a 175-billion-parameter decoder-only transformer trained on 300 billion
# tokens: about 3.14e23 floating-point operations (Table D.1), tens of thousands of GPU-days (the end of
# this tour works it out). None of its training tricks are magic. Each one answers a specific limit —
# memory for activations, memory for optimizer state, the quadratic cost of attention, the speed of one
# device — and each can be *seen* on a laptop CPU with a model hundreds of thousands of times smaller,
# as long as you measure the right thing.
#
# That is what this course does. Every chapter is a notebook that runs in a few minutes on a CPU, builds
# one technique from scratch in the `course` library, **asserts** it is right (equal to the reference,
# or the memory/speed trade-off it promises), and shows the trade-off in a plot from a real run. The
# same notebooks read their sizes from one profile, so on a GPU they run at larger sizes unchanged.
#
# This tour shows the map, the hardware you are on, the text and tokenizers every chapter shares,
# and a first tiny GPT trained here in a minute or two of CPU time.

# %% [markdown]
# ## The map: which chapter explains which part of the story
#
# | chapter | technique | where it shows up in the story |
# |---|---|---|
# | **00 tour** | a tiny GPT end to end | the GPT-2/GPT-3 recipe: next-token prediction, pre-LayerNorm blocks, AdamW + warmup/cosine |
# | **01 attention** | self-attention from scratch, its O(n²) cost, what heads learn | the one operation every model below shares, and its quadratic bill |
# | **02 BERT vs GPT** | masked LM vs next-token LM on the same network | BERT (bidirectional encoder) vs GPT (causal decoder): why GPT-3 generates and BERT fills blanks |
# | **03 sparse attention** | local + global + random block-sparse patterns | GPT-3 alternates dense and locally banded sparse layers (Sparse Transformer); Longformer / BigBird |
# | **04 activation checkpointing** | recompute activations instead of storing them | trading ~1/3 more compute for memory: how long-context, deep models fit |
# | **05 data parallelism & ZeRO** | DDP, then sharding optimizer state, gradients, parameters | how a 175B model's training state (16 bytes per parameter with mixed-precision Adam) is split across GPUs |
# | **06 tensor, sequence, context parallel** | Megatron's column/row splits, ring attention | splitting one layer across the GPUs of a node |
# | **07 pipeline parallelism** | GPipe, 1F1B, interleaved, zero-bubble schedules | splitting the layers across nodes, and the pipeline bubble |
# | **08 GPT-3 at scale** | 3D parallelism, multi-node launch, a planner and simulator | how GPT-3-scale training is laid out over many GPUs (and what the source story gets wrong) |
# | **09 training stability** | schedules, mixed precision, loss spikes, checkpoints and resume | why large runs diverge, and how they survive failures |
# | **10 ViT / CLIP / SAM** | the same transformer on image patches and image–text pairs | Vision Transformer, CLIP's contrastive pre-training, Segment Anything |
# | **11 flash attention** | attention tile by tile with an online softmax | why the s×s matrix never needs to be stored |
#
# Every chapter uses the same small model, `course.model.Transformer`: a GPT when `causal=True`, a BERT
# when `causal=False`. Techniques plug into it from the outside (an attention core, a wrapper around each
# block) — the model itself knows nothing about sparsity, recomputation or parallelism.

# %% [markdown]
# ## The hardware you are on
#
# One call decides the device and a *size profile*: a small model on a CPU (minutes on two cores), a
# larger one on a GPU. Every lesson reads its sizes from it, so nothing below mentions a size twice.

# %%
# NBVAL_IGNORE_OUTPUT
import math

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown

from course.costs import GPT3_175B, PEAK_FLOPS, gpu_days
from course.data import load_corpus, load_dataset
from course.device import machine_info, profile
from course.model import ModelConfig, Transformer
from course.train import TrainConfig, train

prof = profile()
print(prof)
for key, value in machine_info().items():
    print(f"  {key:>14}: {value}")

# %% [markdown]
# ## The text, and two tokenizers
#
# We need real English with no download. Python ships its own documentation: `pydoc_data.topics` is the
# language reference (prose and code examples; its size is printed below). The split between training
# and validation is by passage and deterministic, so the validation text is unseen but similar.
#
# A model reads integers, so text is *tokenized*. Two choices, both trained on the training split:
# - **characters**: one id per character. Tiny vocabulary, long sequences.
# - **byte-level BPE** (GPT-2's tokenizer, Radford et al. 2019): start from the 256 bytes, then
#   repeatedly merge the most frequent adjacent pair into a new token. Frequent words become single
#   tokens, so the same text needs fewer tokens (measured below).
#
# Ids 0–4 are reserved for BERT's special tokens `[PAD] [UNK] [CLS] [SEP] [MASK]` (chapter 02 uses them).

# %%
chars = load_dataset("char")
bpe = load_dataset("bpe", vocab_size=512)
print(f"pydoc_data.topics: {len(load_corpus('pydoc')):,} characters")
print(chars)
print(bpe)
print()
print(chars.tokenizer.decode(chars.val[:300].tolist()))

# %% [markdown]
# The same sentence through both tokenizers: each `|` is a token boundary.

# %%
sentence = "The for statement is used to iterate over the elements of a sequence."
for name, data in (("char", chars), ("bpe", bpe)):
    ids = data.tokenizer.encode(sentence)
    pieces = [data.tokenizer.decode([i]) for i in ids]
    print(f"{name:>4}: {len(ids):3d} tokens  ids {ids[:8]} ...")
    print("      |" + "|".join(pieces) + "|")
    assert data.tokenizer.decode(ids) == sentence  # lossless round trip

# %%
# NBVAL_CHECK_OUTPUT
n_chars = len(chars.tokenizer.decode(chars.val.tolist()))
chars_per_token = {name: n_chars / len(data.val) for name, data in (("char", chars), ("bpe", bpe))}
assert chars_per_token["char"] == 1.0 and chars_per_token["bpe"] > 2.0
print("BPE packs more than 2 characters per token:", chars_per_token["bpe"] > 2.0)

# %%
# NBVAL_IGNORE_OUTPUT
words = len(chars.tokenizer.decode(chars.val.tolist()).split())
Markdown(f"BPE packs {chars_per_token['bpe']:.1f} characters per token on this text: the same context window sees "
         f"{chars_per_token['bpe']:.1f}x as much text ({words / len(bpe.val):.2f} words per token, so a 2,048-token "
         f"window would hold about {2048 * words / len(bpe.val):,.0f} words of it; GPT-2's 50,257-token vocabulary "
         f"packs more). For this tour we use characters anyway: with {chars.tokenizer.vocab_size} symbols a tiny "
         f"model learns visible spelling and punctuation quickly, and its loss is easy to read against the "
         f"uniform guess, log({chars.tokenizer.vocab_size}) = {math.log(chars.tokenizer.vocab_size):.2f} nats.")

# %% [markdown]
# ## A first tiny GPT
#
# The model is GPT-2's layout (nanoGPT's, in fact): token + position embeddings, a stack of pre-LayerNorm
# blocks (causal self-attention, then a 4×-wide GELU MLP, each added back to the residual stream), a final
# LayerNorm and an output layer tied to the token embeddings. The objective is next-token prediction:
# at every position, the cross-entropy of the true next character.
#
# Training uses GPT-3's optimizer recipe (Brown et al. 2020, appendix B): AdamW with β = (0.9, 0.95),
# linear warmup then cosine decay of the learning rate, gradient clipping at 1.0, weight decay 0.1.

# %%
# NBVAL_IGNORE_OUTPUT
data = chars
vocab = data.tokenizer.vocab_size
torch.manual_seed(0)
model = Transformer(ModelConfig.from_profile(prof, vocab, causal=True)).to(prof.device)
print(f"{model.num_params():,} parameters, {model.flops_per_token() / 1e6:.1f} MFLOPs per training token")

gen = torch.Generator().manual_seed(0)
batch_fn = lambda split: data.batch(split, prof.batch_size, prof.block_size, generator=gen, device=prof.device)
cfg = TrainConfig(max_steps=prof.max_steps, batch_size=prof.batch_size, block_size=prof.block_size,
                  lr=3e-3, warmup_steps=20, eval_interval=50, eval_iters=10,
                  autocast_dtype=prof.dtype if prof.device.type == "cuda" else None)
hist = train(model, batch_fn, cfg, label="tiny GPT")
hist

# %% [markdown]
# The loss curve, with the loss of a model that knows nothing — a uniform guess over the vocabulary,
# log(vocab) nats per token. (The first steps sit *at* that line: the initialisation is close to uniform.)

# %%
ax = hist.plot()
ax.axhline(math.log(vocab), color="gray", ls="--", label=f"uniform guess, log({vocab}) = {math.log(vocab):.2f}")
ax.set_title(f"{prof.n_layer}-layer GPT on Python's docs, {prof.batch_size}×{prof.block_size} tokens per step")
ax.legend()
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
uniform = math.log(vocab)
assert hist.val_loss[0] > 0.9 * uniform, "an untrained model should be near the uniform guess"
assert hist.final_val_loss < 0.6 * uniform, f"validation loss {hist.final_val_loss:.2f} did not fall well below {uniform:.2f}"
print("validation loss fell below 60% of the uniform guess:", hist.final_val_loss < 0.6 * uniform)

# %% [markdown]
# The validation loss tracks the training loss closely: with a few hundred steps the model has not seen
# enough text to memorise any of it. Each nat lost is a factor e ≈ 2.7 fewer plausible next characters.
#
# ## What it writes
#
# Generation is the same network run in a loop: predict a distribution for the next character, sample
# one (here with temperature 0.8 and the 20 most likely candidates), append it, repeat. A seeded generator
# makes the sample reproducible on the same machine.

# %%
# NBVAL_IGNORE_OUTPUT
prompt = "The for statement"
idx = torch.tensor([data.tokenizer.encode(prompt)], device=prof.device)
out = model.generate(idx, max_new_tokens=300, temperature=0.8, top_k=20,
                     generator=torch.Generator(device=prof.device).manual_seed(0))
sample = data.tokenizer.decode(out[0].tolist())
print(sample)

# %% [markdown]
# Is that better than noise? One measurable answer: how many of the 3-character sequences it writes
# occur anywhere in the training text, compared with an untrained model sampled the same way.

# %%
train_text = data.tokenizer.decode(data.train.tolist())
seen = {train_text[i:i + 3] for i in range(len(train_text) - 2)}  # every character trigram of the training text
trigram_share = lambda text: sum(text[i:i + 3] in seen for i in range(len(text) - 2)) / (len(text) - 2)

torch.manual_seed(1)
untrained = Transformer(ModelConfig.from_profile(prof, vocab, causal=True)).to(prof.device)
noise = untrained.generate(idx, max_new_tokens=300, temperature=0.8, top_k=20,
                           generator=torch.Generator(device=prof.device).manual_seed(0))
noise = data.tokenizer.decode(noise[0].tolist())[len(prompt):]
print("untrained sample:", repr(noise[:80]))
print(f"trigrams found in the training text: trained {trigram_share(sample[len(prompt):]):.0%}, "
      f"untrained {trigram_share(noise):.0%}")

# %%
# NBVAL_CHECK_OUTPUT
assert sample.startswith(prompt) and len(out[0]) == len(idx[0]) + 300
assert trigram_share(sample[len(prompt):]) > 0.5 > 0.2 > trigram_share(noise)
print("the trained model writes mostly trigrams of real text; the untrained one does not:", True)

# %%
# NBVAL_IGNORE_OUTPUT
Markdown(f"After {hist.elapsed_s:.0f} s of training it has learned spelling fragments, spacing, punctuation and "
         f"the shape of the reference manual's prose, but not meaning. GPT-3 is the same recipe, scaled. How "
         f"far? Training compute is about 6·N·D FLOPs (N parameters, D tokens: per parameter and token, 2 for "
         f"the forward multiply-add and 4 for the backward; Kaplan et al. 2020, §2.1):")

# %% [markdown]
#

# %%
# NBVAL_IGNORE_OUTPUT
N, D = model.num_params(), cfg.max_steps * prof.batch_size * prof.block_size
gpt3 = {"parameters": GPT3_175B["params"], "tokens": GPT3_175B["tokens"], "FLOPs": GPT3_175B["train_flops"]}
ours = {"parameters": N, "tokens": D, "FLOPs": 6 * N * D}
for key in gpt3:
    print(f"{key:>10}: ours {ours[key]:9.2e}   GPT-3 {gpt3[key]:9.2e}   ({gpt3[key] / ours[key]:,.0f}x)")
v100_days = gpu_days(GPT3_175B["train_flops"], PEAK_FLOPS["V100"])
print(f"6·N·D for GPT-3: {6 * GPT3_175B['params'] * GPT3_175B['tokens']:.3g} FLOPs (published: 3.14e23)")
print(f"GPT-3 on one V100 at its {PEAK_FLOPS['V100'] / 1e12:.0f} TFLOP/s fp16 peak: {v100_days:,.0f} days")

# %%
# NBVAL_IGNORE_OUTPUT
Markdown(f"About {math.log10(gpt3['FLOPs'] / ours['FLOPs']):.0f} orders of magnitude of compute separate the two runs "
         f"(GPT-3 has {gpt3['parameters'] / N:,.0f}x our parameters), and even at 100% of its peak a single V100 would "
         f"need {v100_days:,.0f} days: GPT-3 took tens of thousands of GPU-days. Every chapter that follows is about one "
         f"thing that breaks on the way there: attention's quadratic cost, activation memory, optimizer memory, "
         f"and the need to split one model over many devices.")

# %% [markdown]
#
# **Next: `01_attention.ipynb`** builds the attention inside these blocks from scratch, measures why its
# cost grows with the square of the context, and looks at what this kind of model's heads attend to.
