"""One training iteration of a 3D-parallel layout as events: a step-time simulator beside the planner.

    from course import scale, simulate
    sim = simulate.simulate(scale.gpt3("175B"), scale.cluster("dgx-a100", 128),
                            scale.Layout(dp=8, tp=8, pp=16, n_micro=192, zero=1, sp=True))
    sim.step, sim.spans[:3], sim.by_kind(0)       # seconds; Span(rank, stream, kind, label, start, end)

What it plays, per pipeline rank (all dp x cp x tp ranks of one pipeline stage do the same work at the
same time, so one rank per stage stands for them all):
- compute: chapter 07's pipeline IR (`course.parallel.schedules.make` + `simulate`), every forward F
  and backward B of a chunk of l/(p·v) layers for one micro-batch taking its share of the iteration's
  FLOPs (`costs.korthikanti_flops`, as the planner counts them) at `efficiency` of peak;
- tensor-parallel collectives (and ring-attention passes) inside each F and B, on the link the tensor
  groups use (NVLink in a node): they block the compute stream, as Megatron-LM's all-reduces do;
- pipeline sends: a message arrives one hop after the send (α–β on the pipeline groups' link, plus the
  all-gather of Megatron's scatter/gather on the tensor link, Narayanan et al. 2021 §4.1); a receive
  waits for it (the IR's semantics: sends asynchronous, receives blocking);
- the data-parallel gradient reduce, bucketed: a chunk's gradients become ready bucket by bucket
  during its last backward (ZeRO-2: during every backward) and go out in order on the data link while
  compute goes on (PyTorch DDP's bucketing, Li et al. 2020 §3.2); ZeRO-1 all-gathers the updated
  parameters after the step; ZeRO-3 gathers each chunk's weights during the action that needs them
  (prefetched) and reduce-scatters during backward; an action waits for its gathers.
Links follow the α–β model (Hockney 1994): a message of n bytes takes α + n/β; a ring collective
takes steps·α + (bytes one rank sends)/β (Thakur, Rabenseifner & Gropp 2005, §2; `costs.collective_seconds`).

Agreement with `course.scale.plan` (tests/test_simulate.py): with free pipeline hops and no data
parallelism, the planner's (compute + tensor + context)(1 + bubble) is this timeline's length to rounding
(the IR's 1F1B, GPipe and interleaved schedules with equal stages have exactly Megatron's bubble
(p-1)/(v·m)). The planner counts all 2(v·m + p - 1) hops of the critical path as exposed, an upper bound
of the simulated wait. It hides the reduce behind the whole last backward from its start; here bucket k
of n is ready (k+1)/n of the way through, each bucket pays its own ring latencies and the last leaves
no earlier than the backward ends: the two differ by at most one bucket's share of the backward,
(n - 1) extra latencies and one bucket's time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import costs, scale
from .parallel import schedules

STREAMS = ("compute", "pipeline", "data")  # what a rank does one thing at a time on


@dataclass(frozen=True)
class Span:
    rank: int  # pipeline rank (stage index of its first chunk)
    stream: str  # one of STREAMS
    kind: str  # F, B, tensor, context, send, reduce, gather, optimizer
    label: str  # e.g. "0F3" (the IR's action) or "bucket 2"
    start: float
    end: float


@dataclass
class Simulation:
    layout: scale.Layout
    spans: list[Span]
    cost: dict  # the per-action seconds the timeline was played with
    global_ranks: list[int]  # global rank id standing for each pipeline rank
    step: float = field(init=False)

    def __post_init__(self):
        self.step = max(s.end for s in self.spans) - min(s.start for s in self.spans)

    def by_kind(self, rank: int) -> dict:
        """Seconds rank spent per kind of span."""
        out: dict = {}
        for s in self.spans:
            if s.rank == rank:
                out[s.kind] = out.get(s.kind, 0.0) + s.end - s.start
        return out

    def rank_end(self, rank: int) -> float:
        return max(s.end for s in self.spans if s.rank == rank)


def _check_positive(name, x, integer=False, zero=False):
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and (x >= 0 if zero else x > 0)
    if not ok or (integer and not isinstance(x, int)):
        raise ValueError(f"{name} must be a {'non-negative' if zero else 'positive'} "
                         f"{'integer' if integer else 'number'}, got {x!r}")


def action_costs(model, cluster, layout, *, efficiency: float = 0.5, bytes_per_el: int = 2,
                 scatter_gather: bool = True, tensor_within_node: bool = True, pass_overhead: float = 0.0,
                 call_overhead: float = 0.0) -> dict:
    """Seconds of one chunk's F and B for one micro-batch (compute, tensor, context), of a pipeline hop,
    and the data-parallel collectives per rank, from the planner's counts (`course.scale.plan`).
    pass_overhead: fixed seconds of one forward + backward of the whole model (Python, kernel launches),
    whatever its size; a chunk pays its layers' share, which tensor parallelism does not divide.
    call_overhead: seconds every blocking collective or pipeline hop costs beyond its α–β time (waiting
    for the partner that arrives later, waking up): measured on CPU ranks, 0 for the planner's GPUs."""
    _check_positive("pass_overhead", pass_overhead, zero=True)
    _check_positive("call_overhead", call_overhead, zero=True)
    scale.validate(model, cluster, layout, tensor_within_node)
    _check_positive("efficiency", efficiency)
    if efficiency > 1:
        raise ValueError(f"efficiency must be a fraction of peak in (0, 1], got {efficiency!r}")
    _check_positive("bytes_per_el", bytes_per_el, integer=True)
    L, s, b, h, V = layout, model.seq_len, layout.micro_batch, model.d_model, model.vocab
    t, p, m, v, d = L.tp, L.pp, L.n_micro, L.v, L.dp * L.cp
    sl, lpc = s // L.cp, model.n_layer // (p * v)  # local tokens, layers per chunk
    full = L.recompute == "full"
    links = scale.dimension_links(cluster, layout)
    bw = {dim: (cluster.intra_bw, cluster.intra_latency) if ln == "intra" else (cluster.inter_bw, cluster.inter_latency)
          for dim, ln in links.items()}
    compute = costs.korthikanti_flops(s, L.batch, h, model.n_layer, V, L.recompute) / L.world
    per_action = compute / (cluster.gpu.peak_flops * efficiency) / (m * v)  # F + B of one chunk, one micro-batch
    fwd = 1 / 4 if full else 1 / 3  # backward = 2 forwards (+ 1 recomputed forward)
    msg = b * sl * h * bytes_per_el  # one layer's activations of one micro-batch
    ar = costs.collective_seconds("all_reduce", msg, t, *bw["tensor"]) + call_overhead
    kv = costs.collective_seconds("send", 2 * msg / t, 2, *bw["context"]) if L.cp > 1 else 0.0
    hop = costs.collective_seconds("send", msg / t if scatter_gather and t > 1 else msg, 2, *bw["pipeline"])
    hop += call_overhead
    if scatter_gather and t > 1:
        hop += costs.collective_seconds("all_gather", msg, t, *bw["tensor"])
    # the vocabulary-parallel ends (Shoeybi et al. 2019 §3): the embedding's output all-reduce (first
    # chunk's F), the head's input-gradient all-reduce (last chunk's B) and cross-entropy's three
    # all-reduces of one fp32 number per token (max, target logit, sum of exponentials; last chunk's F)
    ce = 3 * costs.collective_seconds("all_reduce", b * sl * 4, t, *bw["tensor"]) + 3 * call_overhead if t > 1 else 0.0
    vocab = {"first_F": ar if t > 1 else 0.0, "last_F": ce, "last_B": ar if t > 1 else 0.0}
    fixed = pass_overhead * lpc / model.n_layer
    return {"F": (per_action + fixed) * fwd, "B": (per_action + fixed) * (1 - fwd),
            "tensor_F": lpc * 2 * ar, "tensor_B": lpc * (4 if full else 2) * ar,
            "context_F": lpc * (L.cp - 1) * kv, "context_B": lpc * (L.cp - 1) * (3 if full else 2) * kv,
            "hop": hop if p > 1 else 0.0, "data_link": bw["data"], "d": d, "links": links,
            "bytes_per_el": bytes_per_el, "call_overhead": call_overhead, "vocab": vocab}


def chunk_params(model, layout, stage: int) -> float:
    """Parameters of one pipeline stage (chunk) on one tensor rank: its layers, plus the embeddings on
    the first and the output layer's LayerNorm (the head is tied) on the last, as the planner counts."""
    S, h = layout.pp * layout.v, model.d_model
    n = model.n_layer // S * (12 * h * h + 13 * h)
    n += (model.vocab + model.seq_len) * h if stage == 0 else 0
    n += model.vocab * h + 2 * h if stage == S - 1 and S > 1 else 0
    return n / layout.tp


def _one_rank_schedule(m: int) -> schedules.Schedule:
    """p = 1: forward then backward of every micro-batch (gradient accumulation)."""
    return schedules.Schedule("single", 1, m, 1, [[schedules.Action(0, k, i) for i in range(m) for k in "FB"]])


def simulate(model, cluster, layout, *, efficiency: float = 0.5, buckets: int = 4, bytes_per_el: int = 2,
             grad_bytes_per_el: int | None = None, step_overhead: float = 0.0, pass_overhead: float = 0.0,
             overlap_dp: float = 1.0, pipeline_link: bool = True, scatter_gather: bool = True,
             tensor_within_node: bool = True, call_overhead: float = 0.0, vocab_parallel: bool = False) -> Simulation:
    """Play one iteration of `layout`; see the module docstring. buckets: data-parallel buckets per chunk.
    step_overhead: seconds of the optimizer step (after the reduce); pass_overhead, call_overhead (also
    paid by each data-parallel bucket): see `action_costs`. vocab_parallel: also play the collectives of
    the vocabulary-parallel embedding, head and cross-entropy (off: as the planner, which leaves them out).
    overlap_dp: the share of the backward the buckets spread over (1: bucket k of n is ready k/n of the
    way through, as in DDP; 0: all ready when it ends, a reduce after backward). pipeline_link=False: hops are free."""
    if not (isinstance(overlap_dp, (int, float)) and 0 <= overlap_dp <= 1):
        raise ValueError(f"overlap_dp must be a fraction in [0, 1], got {overlap_dp!r}")
    _check_positive("buckets", buckets, integer=True)
    _check_positive("step_overhead", step_overhead, zero=True)
    c = action_costs(model, cluster, layout, efficiency=efficiency, bytes_per_el=bytes_per_el,
                     scatter_gather=scatter_gather, tensor_within_node=tensor_within_node, pass_overhead=pass_overhead,
                     call_overhead=call_overhead)
    L, d, link = layout, c["d"], c["data_link"]
    gbytes = grad_bytes_per_el or bytes_per_el
    S = L.pp * L.v
    # ZeRO-3: each action gathers its chunk's weights (backward: and reduce-scatters its gradients) on the
    # data link while it computes; the action lasts as long as the longer of the two
    z3 = {}
    if L.zero == 3 and d > 1:
        for st in range(S):
            w = gbytes * chunk_params(model, L, st) / (model.n_layer // S)  # one layer's 16-bit weights
            per = {op: (model.n_layer // S) * costs.collective_seconds(op, w, d, *link)
                   for op in ("all_gather", "reduce_scatter")}
            z3[st] = {"F": per["all_gather"], "B": per["all_gather"] + per["reduce_scatter"]}

    def tensor(a):  # seconds of tensor-parallel collectives in action a (a.stage: its chunk)
        secs, v = c[f"tensor_{a.kind}"], c["vocab"]
        if vocab_parallel:
            secs += v["first_F"] if a.stage == 0 and a.kind == "F" else 0.0
            secs += v[f"last_{a.kind}"] if a.stage == S - 1 else 0.0
        return secs

    def busy(a):  # seconds the compute stream is busy with action a
        comm = tensor(a) + c[f"context_{a.kind}"]
        return max(c[a.kind], z3[a.stage][a.kind]) + comm if z3 else c[a.kind] + comm

    sched = schedules.make(L.schedule, L.pp, L.n_micro, L.v) if L.pp > 1 else _one_rank_schedule(L.n_micro)
    tl = schedules.simulate(sched, cost=busy, link=c["hop"] if pipeline_link else 0.0)
    spans = []
    for r, events in enumerate(tl.events):
        for a, start, end in events:
            work = max(c[a.kind], z3[a.stage][a.kind]) if z3 else c[a.kind]
            spans.append(Span(r, "compute", a.kind, str(a), start, start + work))
            x = start + work
            for kind, secs in (("tensor", tensor(a)), ("context", c[f"context_{a.kind}"])):
                if secs:
                    spans.append(Span(r, "compute", kind, str(a), x, x + secs))
                    x += secs
            if z3:
                spans.append(Span(r, "data", "gather", str(a), start, start + z3[a.stage][a.kind]))
            sends = (a.kind == "F" and a.stage < S - 1) or (a.kind == "B" and a.stage > 0)
            if sends and c["hop"] and pipeline_link:
                spans.append(Span(r, "pipeline", "send", str(a), end, end + c["hop"]))
        spans += _data_parallel(r, events, L, d, link, gbytes, model, buckets, step_overhead, z3, overlap_dp,
                                c["call_overhead"])
    stride = {dim: 1 for dim in L.order}
    for i in range(len(L.order) - 2, -1, -1):
        stride[L.order[i]] = stride[L.order[i + 1]] * L.sizes()[L.order[i + 1]]
    return Simulation(L, spans, c, [r * stride["pipeline"] for r in range(L.pp)])


def _data_parallel(r, events, L, d, link, gbytes, model, buckets, overhead, z3, overlap, call=0.0) -> list[Span]:
    """The rank's bucketed gradient reduce on the data link (FIFO), the optimizer step, ZeRO-1's gather."""
    end = max(e for _, _, e in events)
    if d == 1 or z3:
        return [Span(r, "compute", "optimizer", "step", end, end + overhead)] if overhead else []
    op = "all_reduce" if L.zero == 0 else "reduce_scatter"
    last = {}  # stage -> its last backward (ZeRO-2: every backward reduces its micro-batch's gradients)
    ready = []  # (time the bucket's gradients are complete, seconds on the link, label)
    for a, start, stop in events:
        if a.kind == "B":
            last[a.stage] = (a, start, stop)
            if L.zero == 2:
                ready += _buckets(a, start, stop, op, gbytes * chunk_params(model, L, a.stage), d, link, buckets, overlap, call)
    if L.zero != 2:
        for a, start, stop in last.values():
            ready += _buckets(a, start, stop, op, gbytes * chunk_params(model, L, a.stage), d, link, buckets, overlap, call)
    out, free = [], 0.0
    for when, secs, label in sorted(ready):
        t0 = max(when, free)
        out.append(Span(r, "data", "reduce", label, t0, t0 + secs))
        free = t0 + secs
    t = max(end, free)
    if overhead:
        out.append(Span(r, "compute", "optimizer", "step", t, t + overhead))
        t += overhead
    if L.zero in (1, 2):
        n = gbytes * sum(chunk_params(model, L, a.stage) for a, _, _ in last.values())
        out.append(Span(r, "data", "gather", "parameters", t, t + costs.collective_seconds("all_gather", n, d, *link)))
    return out


def _buckets(a, start, stop, op, nbytes, d, link, n, overlap=1.0, call=0.0):
    """n equal buckets of a chunk's gradients, the k-th complete (k+1)/n of the way through the last
    `overlap` share of its backward."""
    secs = costs.collective_seconds(op, nbytes / n, d, *link) + call
    return [(stop - overlap * (1 - (k + 1) / n) * (stop - start), secs, f"{a} bucket {k}") for k in range(n)]
