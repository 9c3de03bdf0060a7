"""Activation checkpointing: memory and step time of each recomputation policy, in one run.

    python benchmarks/checkpointing.py           # CPU: the default CPU model, 16 layers deep (about 5 min)
    python benchmarks/checkpointing.py --gpu     # the 'gpu' profile sizes, 16 layers, on CUDA

Two settings on the same sizes:
- "fused": the model's default (fused SDPA attention, no dropout): none, full, every-2, sqrt,
  selective, core-attention.
- "paper": Korthikanti et al.'s setting (attention written out, dropout 0.1): none, selective,
  core-attention.
Two selective policies: "selective" recomputes every op but the linear layers' matmuls and fused
attention (op-level SAC, as torchtitan does it); "core-attention" recomputes only the attention core
(Korthikanti et al.'s selective recomputation, Megatron's --recompute-granularity selective).
A second shape, "gpt3_ratio", in the regime selective recomputation is designed for: GPT-3's ratios
(s/h <= 1/2, with 5*a*s/h large enough that the s^2 attention terms are over 40% of a layer's
activations; GPT-3: s/h = 1/6, 5as/h = 80), few layers, "paper" setting only. Chosen by the formula
before measuring: h=1024, a=16, s=512, b=1, 2 layers (s/h = 1/2, 5as/h = 40, paper-formula overhead 7.5%).
At the first shape (s/h = 1, 5as/h = 20) the paper's own formulas say that recomputing the attention
core frees 20/54 = 37% of a layer's 16-bit activations for 14% extra FLOPs: outside the target.
"core_recompute_ms_per_op" times, on the default shape's (B, nh, T, T) tensors, the ops that recomputing
the attention core repeats: on CPU, dropout's mask (bernoulli_) dominates.
Activation memory = bytes alive at the end of forward (kept for backward), measured by
course.measure.LiveTensors; peak activations = what is alive at the step's peak besides weights and
gradients; layer-units divide by the analytic bytes of one layer without recomputation. Step time =
forward + backward, minimum over interleaved rounds, relative to "none" measured in the same process.
Each setting also times "none#control", an identical second model: its ratio (ideally 1.00) shows how
far apart two measurements of the same work land on this machine.
The last line printed is one JSON object.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from course.costs import korthikanti_flops, layer_activation_bytes  # noqa: E402
from course.device import machine_info, profile  # noqa: E402
from course.lessons.recompute import core_recompute_costs, measure_policies  # noqa: E402
from course.model import MatmulAttention, ModelConfig, Transformer, set_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="use the 'gpu' profile sizes on CUDA")
    ap.add_argument("--n-layer", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads while timing (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prof = profile("gpu" if args.gpu else "cpu", "cuda" if args.gpu else None)
    dev = prof.device
    L, H, C, T, B, V = args.n_layer, prof.n_head, prof.n_embd, prof.block_size, prof.batch_size, 512
    def maker(nl, nh, ne, sl, core, dropout):
        def make():
            torch.manual_seed(0)
            m = Transformer(ModelConfig.gpt(n_layer=nl, n_head=nh, n_embd=ne, block_size=sl, vocab_size=V,
                                            dropout=dropout)).to(dev)
            if core == "matmul":
                set_attention(m, lambda i: MatmulAttention())
            return m
        return make

    dtype_dev = "cuda" if dev.type == "cuda" else "cpu"
    shapes = {  # name: (n_layer, n_head, n_embd, seq_len, batch, settings)
        "default": (L, H, C, T, B, ("fused", "paper")),
        # GPT-3-like ratios (see the module docstring); GPU: s/h = 1/2, 5as/h = 80
        "gpt3_ratio": (4, 32, 2048, 1024, 4, ("paper",)) if args.gpu else (2, 16, 1024, 512, 1, ("paper",)),
    }
    # "none#control": a second, identical model; its time ratio is the timing noise of this machine
    settings = {"fused": ("sdpa", 0.0, ("none", "full", "every-k:2", "sqrt", "selective", "core-attention",
                                        "none#control")),
                "paper": ("matmul", 0.1, ("none", "selective", "core-attention", "none#control"))}
    measured, layer = {}, {}
    for shape, (nl, nh, ne, sl, bs, names) in shapes.items():
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, V, (bs, sl), generator=g).to(dev) for _ in range(2))
        for setting in names:
            core, dropout, policies = settings[setting]
            key = setting if shape == "default" else f"{shape}_{setting}"
            layer[key] = sum(layer_activation_bytes(sl, bs, ne, nh, core=core, dropout=dropout > 0,
                                                    device=dtype_dev).values())
            make = maker(nl, nh, ne, sl, core, dropout)
            results = measure_policies(make, (x, y), policies, rounds=args.rounds, threads=args.threads)
            rows = {}
            for r in results:
                rows[r.policy] = {
                    "activation_bytes": r.activations,
                    "activation_saving": round(1 - r.memory_ratio, 4),
                    "activation_layer_units": round(r.activations / layer[key], 3),
                    "peak_bytes": r.peak,
                    "peak_activation_layer_units": round(r.peak_activations / layer[key], 3),
                    "step_time_s": round(r.step_time, 4),
                    "time_ratio": round(r.time_ratio, 4),
                }
                print(f"{key:17s} {r.policy:14s} activations {r.activations / 2**20:8.1f} MiB "
                      f"({1 - r.memory_ratio:5.1%} saved, {rows[r.policy]['activation_layer_units']:5.2f} "
                      f"layer-units)  peak-activations {rows[r.policy]['peak_activation_layer_units']:5.2f} "
                      f"layer-units  step {r.step_time * 1e3:7.1f} ms  x{r.time_ratio:.3f}", flush=True)
            measured[key] = rows

    f = measured["fused"]
    sqrt_bound = 2 * math.sqrt(L)

    def target(name, tgt, meas, base, ratio, met):
        return name, {"target": tgt, "measured": meas, "baseline": base, "ratio": ratio, "met": bool(met)}

    targets = dict([
        target("full_recompute_time_ratio", "<= 1.45", f["full"]["step_time_s"], f["none"]["step_time_s"],
               f["full"]["time_ratio"], f["full"]["time_ratio"] <= 1.45),
        target("sqrt_peak_activation_layer_units", f"<= 2*sqrt({L}) = {sqrt_bound:.0f}",
               f["sqrt"]["peak_activation_layer_units"], f["none"]["peak_activation_layer_units"],
               round(f["sqrt"]["peak_activation_layer_units"] / sqrt_bound, 4),
               f["sqrt"]["peak_activation_layer_units"] <= sqrt_bound),
    ])
    for key, rows in measured.items():  # every selective policy in every setting, met or not
        for policy in ("selective", "core-attention"):
            r = rows[policy]
            targets.update([target(f"{policy.replace('-', '_')}_{key}", ">= 0.40 saved at <= 1.10x time",
                                   {"saving": r["activation_saving"], "time_ratio": r["time_ratio"]},
                                   {"activation_bytes": rows["none"]["activation_bytes"],
                                    "step_time_s": rows["none"]["step_time_s"]},
                                   r["time_ratio"], r["activation_saving"] >= 0.40 and r["time_ratio"] <= 1.10)])
    # the paper's own FLOPs formula at this shape: selective overhead grows like s/h (GPT-3: s/h = 1/6)
    def predicted(nl, nh, ne, sl, bs, _):
        return round(korthikanti_flops(sl, bs, ne, nl, V, "selective") / korthikanti_flops(sl, bs, ne, nl, V) - 1, 4)

    nl2, nh2, ne2, sl2, bs2, _ = shapes["gpt3_ratio"]
    config = {"profile": prof.name, "selective_overhead_predicted_by_paper_formula": predicted(*shapes["default"]),
              "device": str(dev), "n_layer": L, "n_head": H, "n_embd": C, "seq_len": T,
              "batch": B, "vocab": V, "dtype": "float32", "rounds": args.rounds, "threads": args.threads,
              "gpt3_ratio": {"n_layer": nl2, "n_head": nh2, "n_embd": ne2, "seq_len": sl2, "batch": bs2,
                             "s_over_h": sl2 / ne2, "5as_over_h": 5 * nh2 * sl2 / ne2,
                             "selective_overhead_predicted_by_paper_formula": predicted(*shapes["gpt3_ratio"])},
              "analytic_layer_bytes": layer, "settings": {"fused": "SDPA, dropout 0", "paper": "MatmulAttention, dropout 0.1"}}
    noise = {key: rows["none#control"]["time_ratio"] for key, rows in measured.items()}
    print(json.dumps({"machine": machine_info(), "config": config, "measured": measured,
                      "timing_control_ratio (identical model, ideally 1.0)": noise,
                      "core_recompute_ms_per_op": {"shape (B, nh, T, T)": [B, H, T, T], **{
                          name: round(ms, 3) for name, ms in core_recompute_costs(B, H, T, C // H, device=dev).items()}},
                      "targets": targets}))


if __name__ == "__main__":
    main()
