"""Lesson 09, mixed precision and throughput levers: the runs, tables and figures (library code only).

- `precision_runs`: fp32, bf16 autocast and fp16 autocast + GradScaler on the same model and batches,
  over seeds: final validation loss, tokens/s and the memory of one training step (course.measure).
- `overflow_run` / `plot_scale`: fp16 with a loss scale far too large: every overflowing step is
  skipped and the scale halves until the gradients fit (Micikevicius et al. 2018, section 3.2).
- `pollute` / `filter_runs`: a training corpus with injected bad data (copies, near copies, symbol
  soup, fragments), trained with and without `course.quality.filter_documents`, validated on clean text.
- `levers`: tokens/s of one baseline configuration and of each lever changed alone (data format,
  prefetch, batch size, accumulation, precision), all in this process, so the ratios mean something
  on a loaded machine.
"""
from __future__ import annotations

import contextlib
import random
import shutil
import statistics
import tempfile

import torch

from ..data import CharTokenizer, load_dataset, load_documents, train_val_split
from ..loader import MemmapData, OnTheFlyData, Prefetcher, batches, with_latency
from ..measure import measure_step, time_it
from ..model import ModelConfig, Transformer
from ..quality import filter_documents
from ..train import TrainConfig, evaluate, train

PRECISIONS = ("fp32", "bf16 autocast", "fp16 autocast + loss scaling")
_DTYPE = {"fp32": None, "bf16 autocast": torch.bfloat16, "fp16 autocast + loss scaling": torch.float16}


def small_model(vocab_size: int, seed: int = 0, n_layer=2, n_embd=64, block_size=64) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.gpt(n_layer=n_layer, n_head=4, n_embd=n_embd, block_size=block_size,
                                       vocab_size=vocab_size))


def _config(steps, seed, dtype=None, **kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": steps, "warmup_steps": max(1, steps // 10), "eval_interval": steps,
                          "eval_iters": 4, "seed": seed, "progress": False, "lr": 2e-3, "autocast_dtype": dtype,
                          **kw})


def _scaler(dtype):
    return torch.amp.GradScaler("cpu") if dtype == torch.float16 else None


def precision_runs(seeds=(0, 1, 2), steps=60, batch_size=8, block_size=64) -> dict[str, dict]:
    """{precision: {"val_loss": [per seed], "tokens_per_s": [...], "memory": StepMemory}}."""
    data = load_dataset("char")
    out = {}
    for name in PRECISIONS:
        dtype, row = _DTYPE[name], {"val_loss": [], "tokens_per_s": [], "skipped": []}
        for seed in seeds:
            model = small_model(data.tokenizer.vocab_size, seed, block_size=block_size)
            hist = train(model, batches(data, batch_size, block_size, seed), _config(steps, seed, dtype),
                         label=name, scaler=_scaler(dtype))
            row["val_loss"].append(hist.final_val_loss)
            row["tokens_per_s"].append(hist.median_tokens_per_s)
            row["skipped"].append(len(hist.skipped))
        batch = batches(data, batch_size, block_size, 99)("train")
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            row["memory"] = measure_step(small_model(data.tokenizer.vocab_size, block_size=block_size), batch)
        out[name] = row
    return out


def precision_table(runs: dict[str, dict]) -> str:
    """Markdown: mean ± spread over seeds of validation loss, tokens/s; one step's memory."""
    base = statistics.mean(runs["fp32"]["tokens_per_s"])
    lines = ["| precision | val loss (mean ± sd) | tokens/s | vs fp32 | step peak MiB | activations MiB | skipped steps |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        sd = statistics.stdev(r["val_loss"]) if len(r["val_loss"]) > 1 else 0.0
        tps = statistics.mean(r["tokens_per_s"])
        lines.append(f"| {name} | {statistics.mean(r['val_loss']):.3f} ± {sd:.3f} | {tps:,.0f} | {tps / base:.2f}x | "
                     f"{r['memory'].peak / 2**20:.2f} | {r['memory'].activations / 2**20:.2f} | {sum(r['skipped'])} |")
    return "\n".join(lines)


def overflow_run(init_scale=2.0 ** 30, steps=20, growth_interval=5, seed=0) -> dict:
    """fp16 with a far-too-large initial loss scale: the scale before each step, the skipped steps."""
    data = load_dataset("char")
    model = small_model(data.tokenizer.vocab_size, seed)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    scales = []
    hist = train(model, batches(data, 8, 64, seed), _config(steps, seed, torch.float16), label="fp16",
                 scaler=scaler, hooks=[lambda event, st: event == "after_backward" and scales.append(scaler.get_scale())])
    return {"scale": scales, "skipped": hist.skipped, "loss": hist.train_loss, "final_scale": scaler.get_scale()}


def plot_scale(run: dict, ax=None):
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(6, 3))[1]
    steps = range(len(run["scale"]))
    ax.semilogy(steps, run["scale"], "o-", label="loss scale used in the step")
    ax.semilogy(run["skipped"], [run["scale"][s] for s in run["skipped"]], "rx", ms=10,
                label="overflow: step skipped, scale halved")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss scale (log)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


# ----------------------------------------------------------------------------- data quality

def pollute(docs, seed=0, copies=30, near=30, junk=120, fragments=30) -> list[str]:
    """docs plus bad data: exact copies of one document, near copies of it (one word changed), symbol soup
    and short fragments, shuffled in (a deterministic function of seed)."""
    rng = random.Random(seed)
    victim = docs[rng.randrange(len(docs))]
    words = victim.split()
    bad = [victim] * copies
    for _ in range(near):
        w = list(words)
        w[rng.randrange(len(w))] = rng.choice(words)
        bad.append(" ".join(w))
    soup = "#$%&*+/<=>@[]^{|}~0123456789"
    bad += ["".join(rng.choice(soup + " ") for _ in range(2000)) for _ in range(junk)]
    bad += [" ".join(rng.choice(words) for _ in range(8)) for _ in range(fragments)]
    out = list(docs) + bad
    rng.shuffle(out)
    return out


def filter_runs(seeds=(0, 1, 2), steps=80, batch_size=8, block_size=64) -> dict[str, object]:
    """Train on the polluted corpus and on its filtered version; validation on the clean held-out text."""
    train_docs, val_text = _split_docs()
    polluted = pollute(train_docs)
    kept, report = filter_documents(polluted)
    tok = CharTokenizer.train("\n\n".join(polluted) + val_text)
    val = torch.tensor(tok.encode(val_text))
    clean = set(train_docs)
    out = {"report": report, "n_docs": (len(polluted), len(kept)), "kept": kept,
           "real_removed": len(clean - set(kept))}  # original documents the rules or dedup dropped
    for name, docs in (("polluted", polluted), ("filtered", kept)):
        from ..data import TextData
        data = TextData(torch.tensor(tok.encode("\n\n".join(docs))), val, tok, name)
        losses = []
        for seed in seeds:
            model = small_model(tok.vocab_size, seed, block_size=block_size)
            train(model, batches(data, batch_size, block_size, seed), _config(steps, seed), label=name)
            losses.append(evaluate(model, batches(data, 16, block_size, 1000), iters=8))
        out[name] = losses
    return out


def _split_docs():
    """pydoc topics: every 10th to validation (whole documents, so no copy of a validation text is trained on)."""
    docs = load_documents("pydoc")
    return [d for i, d in enumerate(docs) if i % 10 != 9], "\n\n".join(d for i, d in enumerate(docs) if i % 10 == 9)


# ----------------------------------------------------------------------------- throughput levers

def batch_times(batch_size=8, block_size=64, repeats=20) -> dict[str, float]:
    """Seconds to prepare one batch (course.measure.time_it: the minimum of `repeats`), and to start:
    tokenizing the corpus vs opening its memory-mapped token file."""
    data = load_dataset("char")
    text = train_val_split(load_documents("pydoc"))
    with tempfile.TemporaryDirectory(prefix="tokens-") as folder:
        MemmapData.write(data, folder)
        sources = {"in-memory tensor": data, "memory-mapped file": MemmapData(folder),
                   "tokenize on the fly": OnTheFlyData(*text, data.tokenizer, chars_per_token=1)}
        out = {f"batch: {k}": time_it(lambda fn=batches(v, batch_size, block_size): fn("train"), repeats)
               for k, v in sources.items()}
        out["startup: tokenize the corpus"] = time_it(lambda: [data.tokenizer.encode(t) for t in text], 1, 0)
        out["startup: open the memory-mapped file"] = time_it(lambda: MemmapData(folder), repeats)
    return out


def levers(steps=10, rounds=2, batch_size=8, block_size=64, latency_s=0.02, seed=0) -> list[dict]:
    """Tokens/s of a baseline and of each lever changed alone, run round-robin `rounds` times in this
    process; the statistic is the best step (course.measure's rule: load only ever adds time).
    `latency_s` simulates slow storage for the two prefetch rows."""
    data = load_dataset("char")
    text = train_val_split(load_documents("pydoc"))
    folder = tempfile.mkdtemp(prefix="tokens-")
    mm, fly = MemmapData.write(data, folder), OnTheFlyData(*text, data.tokenizer, chars_per_token=1)
    slow = f"slow storage ({latency_s * 1e3:.0f} ms per batch)"
    configs = {"baseline: in-memory tensor, B=8, fp32": {},
               "data format: memory-mapped token file": dict(source=mm),
               "data format: tokenize on the fly": dict(source=fly),
               f"{slow}, synchronous": dict(latency=latency_s),
               f"{slow}, prefetch thread": dict(latency=latency_s, prefetch=True),
               "batch size 32": dict(bs=4 * batch_size),
               "accumulation 4 x B=8 (32 per step)": dict(accum=4),
               "precision: bf16 autocast": dict(dtype=torch.bfloat16),
               "precision: fp16 autocast + loss scaling": dict(dtype=torch.float16)}

    def run(source=data, bs=batch_size, accum=1, dtype=None, latency=0.0, prefetch=False):
        model = small_model(data.tokenizer.vocab_size, seed, block_size=block_size)
        fn = batches(source, bs, block_size, seed)
        fn = with_latency(fn, latency) if latency else fn
        with Prefetcher(fn, depth=2) if prefetch else contextlib.nullcontext(fn) as loader:
            hist = train(model, loader, _config(steps, seed, dtype, grad_accum=accum, eval_iters=1,
                                                eval_interval=10 ** 6), scaler=_scaler(dtype))
        return max(hist.tokens_per_s[1:]), bs * accum * block_size

    best = {}
    for _ in range(rounds):
        for name, kw in configs.items():
            tps, tokens = run(**kw)
            best[name] = (max(tps, best.get(name, (0, 0))[0]), tokens)
    shutil.rmtree(folder)
    base = best[next(iter(configs))][0]
    return [{"lever": k, "tokens_per_s": t, "vs_baseline": t / base, "tokens_per_step": n} for k, (t, n) in best.items()]


def levers_table(rows: list[dict], times: dict[str, float] | None = None) -> str:
    lines = ["| lever | tokens/s (best step) | vs baseline | tokens per step |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lever']} | {r['tokens_per_s']:,.0f} | {r['vs_baseline']:.2f}x | {r['tokens_per_step']} |")
    for k, v in (times or {}).items():
        lines.append(f"| {k} | {v * 1e3:,.2f} ms | | |")
    return "\n".join(lines)
