"""Training throughput of the course's GPT against a minimal nanoGPT-layout GPT, same config, same machine.

    python benchmarks/train_throughput.py              # CPU profile (about a minute on 2 cores)
    python benchmarks/train_throughput.py --gpu        # GPU profile, bf16 autocast
    python benchmarks/train_throughput.py --steps 10 --rounds 4 --threads 1

Both models get the same sizes (course.device.profile()), the same seed, the same pre-drawn batches
and the same optimizer recipe (AdamW, warmup + cosine, clip 1.0). The course model is trained by
`course.train.train` (the loop every lesson uses); the reference by a plain nanoGPT-style loop.
They run alternately in one process, `--rounds` rounds of `--steps` steps each, the order flipped
every round so drift in machine load hits both alike. Step time is the minimum over all steps except
each round's first (it pays optimizer-state allocation): course.measure's one statistic, since other
work on the machine only ever adds time; the median and the 10th/90th percentiles are reported too.

Peak memory: on GPU torch.cuda.max_memory_allocated; on CPU course.measure.LiveTensors (the bytes
of live tensor storages (parameters + everything the training steps allocate: activations, grads,
AdamW state) over two steps. The process's ru_maxrss is reported too (it covers both models).
The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from course.data import load_dataset  # noqa: E402
from course.device import machine_info, profile  # noqa: E402
from course.measure import LiveTensors, sync  # noqa: E402
from course.model import ModelConfig, Transformer  # noqa: E402
from course.train import TrainConfig, lr_at, train  # noqa: E402
from reference_gpt import GPT, GPTConfig  # noqa: E402

NOISE_BAND = 0.05  # "at least as fast" within 5 %: run-to-run spread of the median on a shared CPU


def reference_train(model: GPT, batch_fn, cfg: TrainConfig) -> list[float]:
    """nanoGPT's train.py loop, minus eval and logging: returns seconds per step."""
    device = next(model.parameters()).device
    opt = model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.betas)
    ctx = (torch.autocast(device_type=device.type, dtype=cfg.autocast_dtype) if cfg.autocast_dtype
           else torch.autocast(device_type=device.type, enabled=False))
    times = []
    model.train()
    for step in range(cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        x, y = batch_fn("train")
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # CPU-GPU sync point: the step has finished here
        times.append(time.perf_counter() - t0)
    return times


def make_batch_fn(batches):
    """Cycle through pre-drawn (x, y) batches so both models see exactly the same data."""
    state = {"i": 0}

    def batch_fn(split):
        if split == "val":
            return batches[0]
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        return b
    return batch_fn


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="GPU profile on CUDA (bf16 autocast)")
    ap.add_argument("--steps", type=int, default=20, help="steps per round per model (default 20)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2 (the first step of a round is not timed), got {args.steps}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.gpu and not torch.cuda.is_available():
        raise ValueError("--gpu needs CUDA, and torch.cuda.is_available() is False")

    prof = profile("gpu", "cuda") if args.gpu else profile()
    device = prof.device
    autocast = prof.dtype if device.type == "cuda" and prof.dtype != torch.float32 else None
    data = load_dataset("char")
    V = data.tokenizer.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [tuple(t.contiguous() for t in data.batch("train", prof.batch_size, prof.block_size,
                                                           generator=g, device=device))
               for _ in range(args.steps)]  # contiguous, as nanoGPT's get_batch stacks them
    cfg = TrainConfig(max_steps=args.steps, batch_size=prof.batch_size, block_size=prof.block_size,
                      lr=1e-3, warmup_steps=2, eval_interval=10 ** 9, eval_iters=1,
                      autocast_dtype=autocast, progress=False)

    torch.manual_seed(0)
    ours = Transformer(ModelConfig.from_profile(prof, V)).to(device)
    torch.manual_seed(0)
    ref = GPT(GPTConfig(block_size=prof.block_size, vocab_size=V, n_layer=prof.n_layer,
                        n_head=prof.n_head, n_embd=prof.n_embd)).to(device)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    if n_ours != n_ref:
        raise RuntimeError(f"models differ in size: course {n_ours:,} vs reference {n_ref:,} parameters")

    def run_ours():
        hist = train(ours, make_batch_fn(batches), cfg)
        return [prof.batch_size * prof.block_size / tps for tps in hist.tokens_per_s]

    def run_ref():
        return reference_train(ref, make_batch_fn(batches), cfg)

    load_start = os.getloadavg()[0]
    times = {"course": [], "reference": []}
    runners = {"course": run_ours, "reference": run_ref}
    for r in range(args.rounds):
        order = ["course", "reference"] if r % 2 == 0 else ["reference", "course"]
        for name in order:
            sync(device)
            times[name] += runners[name]()[1:]  # drop each round's first step
    load_end = os.getloadavg()[0]

    def peak_bytes(name) -> int:
        model = ours if name == "course" else ref
        two = TrainConfig(**{**cfg.__dict__, "max_steps": 2})
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            run = train if name == "course" else reference_train
            run(model, make_batch_fn(batches), two)
            return torch.cuda.max_memory_allocated(device)
        tracker = LiveTensors()
        for p in model.parameters():
            tracker.register(p)
        with tracker:
            (train if name == "course" else reference_train)(model, make_batch_fn(batches), two)
        return tracker.peak

    peak = {name: peak_bytes(name) for name in ("course", "reference")}
    tokens_per_step = prof.batch_size * prof.block_size
    measured = {}
    for name, ts in times.items():
        ts = sorted(ts)
        med, best = ts[len(ts) // 2], ts[0]
        measured[name] = {
            "step_time_s_min": round(best, 5),
            "step_time_s_median": round(med, 5),
            "step_time_s_p10": round(ts[len(ts) // 10], 5),
            "step_time_s_p90": round(ts[(9 * len(ts)) // 10], 5),
            "tokens_per_s": round(tokens_per_step / best, 1),
            "timed_steps": len(ts),
            "peak_memory_mb": round(peak[name] / 2 ** 20, 2),
        }
    ratio = measured["course"]["tokens_per_s"] / measured["reference"]["tokens_per_s"]
    measured["peak_memory_method"] = ("torch.cuda.max_memory_allocated over 2 steps" if device.type == "cuda"
                                      else "course.measure.LiveTensors over 2 steps "
                                           "(parameters + activations + grads + AdamW state)")
    measured["process_max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    measured["load_avg_1min"] = {"start": round(load_start, 2), "end": round(load_end, 2)}
    result = {
        "machine": machine_info(),
        "config": {
            "profile": prof.name, "device": str(device), "n_layer": prof.n_layer, "n_head": prof.n_head,
            "n_embd": prof.n_embd, "block_size": prof.block_size, "batch_size": prof.batch_size,
            "vocab_size": V, "tokenizer": "char", "parameters": n_ours,
            "autocast": str(autocast).replace("torch.", "") if autocast else "none (fp32)",
            "steps_per_round": args.steps, "rounds": args.rounds, "tokens_per_step": tokens_per_step,
        },
        "measured": measured,
        "targets": {
            "train_tokens_per_s_vs_nanogpt_layout": {
                "target": f"course tokens/s >= reference tokens/s (ratio >= {1 - NOISE_BAND:.2f}, "
                          f"a {NOISE_BAND:.0%} timing-noise band)",
                "measured": measured["course"]["tokens_per_s"],
                "baseline": measured["reference"]["tokens_per_s"],
                "ratio": round(ratio, 3),
                "met": bool(ratio >= 1 - NOISE_BAND),
            },
        },
    }
    for name in ("course", "reference"):
        m = measured[name]
        print(f"{name:>9}: {m['tokens_per_s']:>10,.0f} tokens/s, step {m['step_time_s_min'] * 1e3:.1f} ms (min; median {m['step_time_s_median'] * 1e3:.1f}, "
              f"p10 {m['step_time_s_p10'] * 1e3:.1f}, p90 {m['step_time_s_p90'] * 1e3:.1f}), "
              f"peak {m['peak_memory_mb']:.1f} MB")
    print(f"ratio course / reference: {ratio:.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
