"""Tensor, sequence and context parallelism on gloo ranks: step time, communication, bytes, memory.

- Tensor parallelism on 2 ranks: step time of the split model vs one process training the whole model
  (same batch, one thread per process, alternating rounds in one launch: the same machine load), and the
  share of its steps spent in collectives (Comm's timeline); target: counted bytes per layer =
  8·b·s·h·(t-1)/t elements, exactly (and sequence parallelism's: the same + 2 re-gathers).
- Sequence parallelism: LayerNorm and dropout activation bytes per rank <= (1/t + 5%) of tensor parallel's.
- Ring attention on 4 ranks at 4x the sequence one process can hold in a memory budget (the budget: whole
  attention's peak at T1, written out): peak attention memory per rank <= (1/cp + 10%) of whole attention's
  at 4·T1 (LiveTensors, forward + backward, inputs excluded).

    python benchmarks/model_parallel.py          # CPU: gloo
    python benchmarks/model_parallel.py --gpu    # GPU profile sizes; NCCL needs a GPU per rank, else gloo on the CPU
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from course.costs import tensor_parallel_bytes  # noqa: E402
from course.device import machine_info, profile  # noqa: E402
from course.parallel import launch  # noqa: E402
from course.parallel.cp_experiments import attention_memory, memory_sweep  # noqa: E402
from course.parallel.experiments import Setup  # noqa: E402
from course.parallel.tp_experiments import benchmark_two_ranks  # noqa: E402

LN_DROPOUT = ("ln_1", "ln_2", "attn.resid_dropout", "mlp.dropout")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="GPU profile sizes (NCCL when there is a GPU per rank)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    prof, note = profile("gpu" if args.gpu else "cpu"), None
    if prof.device.type == "cuda" and torch.cuda.device_count() < 4:
        note = (f"{torch.cuda.device_count()} GPU(s) < 4 ranks: NCCL needs one GPU per rank, so this ran on the "
                f"CPU with gloo at CPU sizes")
        prof = profile("cpu")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the spawned ranks then pick gloo on the CPU
    t, cp, cores = 2, 4, os.cpu_count() or 1
    setup = Setup(n_layer=prof.n_layer, n_head=prof.n_head, n_embd=prof.n_embd, vocab_size=256,
                  block_size=prof.block_size, batch_size=prof.batch_size // 2, steps=4, dtype="float32")
    threads = max(1, cores // t)
    two = launch.run(benchmark_two_ranks, t, setup, args.rounds, timeout=1200, threads=threads).values[0]
    timed = two["time"]

    b, s, h = setup.batch_size, setup.block_size, setup.n_embd
    counted = {k: two["block"][k]["forward"]["bytes"] + two["block"][k]["backward"]["bytes"] for k in ("tensor", "sequence")}
    formula = {k: tensor_parallel_bytes(b, s, h, t, bytes_per_el=4, sequence_parallel=k == "sequence")["total"]
               for k in ("tensor", "sequence")}
    mem = two["memory"]
    ln_drop = {k: sum(mem[k]["by_module"].get(f"blocks.0.{m}", 0) for m in LN_DROPOUT) for k in ("tensor", "sequence")}

    T1, B, H, D = 512, 1, 4, 32  # T1: what one process holds in the budget (whole attention written out)
    budget = attention_memory(B, H, T1, D)["peak"]
    full = attention_memory(B, H, cp * T1, D)["peak"]
    rings = launch.run(memory_sweep, cp, B, H, D, (cp * T1,), ("zigzag",), timeout=1200).values
    ring = max(r["zigzag"][0]["peak"] for r in rings)

    tp_s, one_s = timed["tensor"]["min_step_s"], timed["whole"]["min_step_s"]
    out = {
        "machine": machine_info(),
        "config": {"tensor_parallel": t, "context_parallel": cp, "profile": prof.name, "n_layer": setup.n_layer,
                   "n_embd": h, "n_head": setup.n_head, "block_size": s, "batch": b, "dtype": "float32",
                   "threads_per_process": threads, "rounds": args.rounds, "steps_per_round": setup.steps,
                   "ring": {"T1": T1, "T": cp * T1, "batch": B, "heads": H, "head_dim": D, "layout": "zigzag"},
                   "note": note},
        "measured": {"tensor_parallel_step_s": tp_s, "sequence_parallel_step_s": timed["sequence"]["min_step_s"],
                     "one_process_step_s": one_s, "tensor_parallel_comm_share": timed["tensor"]["comm_share"],
                     "sequence_parallel_comm_share": timed["sequence"]["comm_share"],
                     "bytes_per_layer_counted": counted, "bytes_per_layer_formula": formula,
                     "ln_dropout_bytes_per_rank": ln_drop, "block_bytes_per_rank": {k: mem[k]["block"] for k in mem},
                     "attention_peak_bytes": {"budget_one_process_T1": budget, "one_process_4T1": full,
                                              "ring_per_rank_4T1": ring}},
        "targets": {
            "tp_bytes_equal_formula": {"target": "8·b·s·h·(t-1)/t elements per layer, exactly", "measured": counted["tensor"],
                                       "baseline": formula["tensor"], "ratio": counted["tensor"] / formula["tensor"],
                                       "met": counted["tensor"] == formula["tensor"]},
            "sp_bytes_equal_formula": {"target": "TP bytes + 2 re-gathers, exactly", "measured": counted["sequence"],
                                       "baseline": formula["sequence"], "ratio": counted["sequence"] / formula["sequence"],
                                       "met": counted["sequence"] == formula["sequence"]},
            "sp_ln_dropout_memory": {"target": f"<= 1/t + 5% = {1 / t + 0.05:.2f} of tensor parallel's",
                                     "measured": ln_drop["sequence"], "baseline": ln_drop["tensor"],
                                     "ratio": ln_drop["sequence"] / ln_drop["tensor"],
                                     "met": ln_drop["sequence"] <= (1 / t + 0.05) * ln_drop["tensor"]},
            "ring_peak_memory_per_rank": {"target": f"<= 1/cp + 10% = {1 / cp + 0.10:.2f} of whole attention's at 4·T1",
                                          "measured": ring, "baseline": full, "ratio": ring / full,
                                          "met": ring <= (1 / cp + 0.10) * full},
            "tp_step_time_vs_one_process": {"target": "reported (no target: on CPU, gloo through shared memory)",
                                            "measured": tp_s, "baseline": one_s, "ratio": tp_s / one_s, "met": None},
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
