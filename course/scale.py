"""A 3D-parallel training planner: memory, communication, step time and days to train, in closed form.

    from course import scale
    p = scale.plan(scale.gpt3("175B"), scale.cluster("dgx-a100", nodes=128),
                   scale.Layout(dp=8, tp=8, pp=16, n_micro=192, zero=1, sp=True))
    p.memory["total"] / 1e9, p.step, p.mfu, p.days(300e9)
    scale.search(model, cluster, batch=1536)[:5]      # valid layouts that fit, fastest first
    course.scale_calibration.megatron_efficiency()    # the efficiency, fitted on one published run

Every formula comes from course.costs with its source:
- parameters: `gpt_params`, the exact count of the GPT layout (Narayanan et al. 2021, eq. 2).
- FLOPs per iteration: `korthikanti_flops` — with full recomputation Narayanan et al.'s eq. 3,
  96·B·s·l·h²(1 + s/6h + V/16lh); without, 72·B·s·l·h²(1 + s/6h + V/12lh) = (6N + 12·l·h·s) per token,
  PaLM's model FLOPs (appendix B), from which MFU is computed.
- memory per GPU: `model_state_bytes` (ZeRO, Rajbhandari et al. 2020) on the parameters of the largest
  pipeline stage divided by t, sharded over the dp·cp ranks; activations `tp_layer_activation_bytes`
  (Korthikanti et al. 2022, Table 2) × the layers of a stage × the micro-batches the schedule keeps in
  flight (`in_flight_microbatches`: GPipe m, 1F1B p on the first stage, interleaved 1 + (p-1)/(pv) times
  that) — the term a calculator that counts one micro-batch leaves out — plus, with full recomputation,
  one layer recomputed in backward, and on the last stage the output layer's 4sbh(1 + V/h)/t (§4.3).
- communication per iteration: tensor 4 all-reduces per layer and micro-batch (forward 2, backward 2;
  6 when full recomputation repeats the forward; sequence parallelism swaps each for a reduce-scatter +
  all-gather of the same volume, Korthikanti §4.2.2) of b·s·h 16-bit values; pipeline one b·s·h send per
  micro-batch, chunk and direction (÷t over the slow link with Megatron's scatter/gather, §4.1); data
  parallel the gradients' ring all-reduce 2(d-1)/d·Ψ·2 bytes (ZeRO-2/3 per micro-batch, 3Ψ for ZeRO-3,
  ZeRO §7); context parallel (ring attention, Liu et al. 2023) K and V passed cp - 1 times per layer.
- step time: compute at a stated fraction of peak (`efficiency`), × (1 + Megatron's bubble (p-1)/(vm)),
  plus the communication on the link each dimension's groups use (alpha-beta), none overlapped except
  the data-parallel reduce, which may hide behind the backward pass (overlap_dp).
A dimension's groups stay inside a node when its stride × size ≤ GPUs per node (ranks numbered
row-major over `Layout.order`, outermost first, as course.parallel.mesh.Mesh does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from . import costs
from .scale_presets import GB, GPUS, NODES, Cluster, GPTSpec, cluster, gpt3  # noqa: F401 (re-exported)

DIMS = ("pipeline", "data", "context", "tensor")  # default order, outermost first: tensor inside a node
RECOMPUTE = ("none", "selective", "full")
# schedule name -> (in_flight(p, m, v, stage), bubble(p, m, v)); chapter 07's simulator can register more
SCHEDULES = {name: (lambda p, m, v, stage, n=name: costs.in_flight_microbatches(n, p, m, v, stage),
                    costs.pipeline_bubble) for name in costs.PIPELINE_SCHEDULES}


def register_schedule(name: str, in_flight, bubble) -> None:
    """Add a pipeline schedule: in_flight(p, m, v, stage) -> micro-batches of l/p layers held at the peak,
    bubble(p, m, v) -> idle time relative to the ideal (e.g. from chapter 07's schedule simulator)."""
    if not (isinstance(name, str) and name) or not callable(in_flight) or not callable(bubble):
        raise ValueError(f"register_schedule needs a name and two callables, got {name!r}, {in_flight!r}, {bubble!r}")
    SCHEDULES[name] = (in_flight, bubble)


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    v: int = 1  # model chunks per pipeline rank (interleaved schedule)
    micro_batch: int = 1  # sequences per micro-batch (b)
    n_micro: int = 1  # micro-batches per iteration per data-parallel replica (m)
    zero: int = 0
    recompute: str = "full"
    sp: bool = False
    schedule: str = "1f1b"
    order: tuple = DIMS

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def batch(self) -> int:  # global batch in sequences
        return self.dp * self.n_micro * self.micro_batch

    def sizes(self) -> dict:
        return {"pipeline": self.pp, "data": self.dp, "context": self.cp, "tensor": self.tp}


@dataclass
class Plan:
    model: GPTSpec
    cluster: Cluster
    layout: Layout
    efficiency: float
    params: int
    flops: float  # per iteration, as run (recomputation included): Megatron's count
    model_flops: float  # per iteration, PaLM's 6N + 12lhs per token (no recomputation)
    memory: dict  # bytes per GPU on the fullest stage: params, grads, optimizer, activations, buffers, total
    stage_memory: dict  # the same for the first and the last pipeline stage: {stage index: dict}
    comm_bytes: dict  # bytes one GPU sends per iteration, per dimension
    links: dict  # dimension -> "intra" (inside a node) or "inter" (across nodes)
    times: dict  # seconds per iteration: compute, bubble, then exposed communication per dimension
    step: float = field(init=False)
    simulated: float | None = field(default=None, init=False)  # course.simulate's step, set by search

    def __post_init__(self):
        self.step = sum(self.times.values())

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.cluster.gpu.memory

    @property
    def slow_bytes(self) -> float:  # bytes one GPU sends over inter-node links per iteration
        return sum(b for d, b in self.comm_bytes.items() if self.links[d] == "inter")

    @property
    def tokens_per_s(self) -> float:
        return self.layout.batch * self.model.seq_len / self.step

    @property
    def tflops_per_gpu(self) -> float:  # achieved, counting recomputation (Narayanan et al.'s Table 1)
        return self.flops / self.step / self.layout.world / 1e12

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step / (self.layout.world * self.cluster.gpu.peak_flops)

    def days(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / 86400


def plan(model: GPTSpec, cluster: Cluster, layout: Layout, *, efficiency: float = 0.5, precision: str = "mixed",
         overlap_dp: float = 1.0, scatter_gather: bool = True, tensor_within_node: bool = True,
         must_fit: bool = False) -> Plan:
    """Memory, communication and step time of `model` trained with `layout` on `cluster`.

    efficiency: achieved fraction of peak FLOP/s of the compute (stated, or fitted by
    course.scale_calibration.calibrate).
    overlap_dp: share of its window the data-parallel traffic hides behind (1 perfectly, 0 not at all).
    tensor_within_node: the constraint that tensor groups stay inside a node (Narayanan et al. 2021,
    §3.2 takeaway 1); False lets a layout put them across nodes. must_fit: raise if it does not fit.
    """
    validate(model, cluster, layout, tensor_within_node)
    if not (isinstance(efficiency, (int, float)) and 0 < efficiency <= 1):
        raise ValueError(f"efficiency must be a fraction of peak in (0, 1], got {efficiency!r}")
    if not (isinstance(overlap_dp, (int, float)) and 0 <= overlap_dp <= 1):
        raise ValueError(f"overlap_dp must be a fraction in [0, 1], got {overlap_dp!r}")
    L, s, b, h, a, V = layout, model.seq_len, layout.micro_batch, model.d_model, model.n_head, model.vocab
    t, p, m, d = L.tp, L.pp, L.n_micro, L.dp * L.cp  # ZeRO and the gradient reduce span dp x cp
    sl, lps = s // L.cp, model.n_layer // p  # local tokens (context parallel), layers per pipeline rank
    in_flight, bubble = SCHEDULES[L.schedule]
    # memory: parameters and activations of the first and the last stage; report the fuller one
    layer_p, emb_p = 12 * h * h + 13 * h, (V + s) * h
    layer_act = costs.tp_layer_activation_bytes(sl, b, h, a, t, L.sp, L.recompute)
    if L.recompute == "none":  # ring attention: s/cp queries against all s keys
        layer_act += 5 * a * sl * (s - sl) * b / t
    work = (costs.tp_layer_activation_bytes(sl, b, h, a, t, L.sp, "none") if L.recompute == "full" else 0)
    stages = {}
    for k in sorted({0, p - 1}):
        n_p = lps * layer_p + (emb_p if k == 0 else 0) + (V * h + 2 * h if k == p - 1 and p > 1 else 0)
        act = in_flight(p, m, L.v, k) * lps * layer_act + work
        act += 4 * sl * b * h * (1 + V / h) / t if k == p - 1 else 0  # output layer (Korthikanti §4.3)
        state = model_state(n_p, L, precision)
        # ZeRO-3 gathers a layer's 16-bit weights before using it (and the next one, prefetched) and holds
        # its full gradient until the reduce-scatter: three layers' worth of transient buffers (FSDP-style)
        buffers = 3 * 2 * layer_p / t if L.zero == 3 and d > 1 else 0.0
        stages[k] = {"params": state["params"], "grads": state["grads"], "optimizer": state["optimizer"],
                     "activations": act, "buffers": buffers, "total": state["total"] + act + buffers}
    mem = max(stages.values(), key=lambda x: x["total"])
    n_stage = max(lps * layer_p + emb_p, lps * layer_p + (V * h + 2 * h if p > 1 else 0)) / t  # for the reduce
    # compute: the iteration's FLOPs spread evenly over the GPUs, at `efficiency` of peak
    flops = costs.korthikanti_flops(s, L.batch, h, model.n_layer, V, L.recompute)
    model_flops = costs.flops_per_token(model.matmul_params, model.n_layer, h, s) * L.batch * s
    t_compute = flops / L.world / (cluster.gpu.peak_flops * efficiency)
    bwd_share = 3 / 4 if L.recompute == "full" else 2 / 3  # backward (+ recomputed forward) of a step
    links = dimension_links(cluster, layout)
    bw = {dim: (cluster.intra_bw, cluster.intra_latency) if ln == "intra" else (cluster.inter_bw, cluster.inter_latency)
          for dim, ln in links.items()}
    msg = b * sl * h * 2  # one micro-batch's activations of one layer, 16-bit
    # tensor: all-reduces per layer and micro-batch, every layer of this rank, every micro-batch
    n_tp = m * lps * (6 if L.recompute == "full" else 4)
    comm = {"tensor": n_tp * costs.ring_bytes("all_reduce", msg, t)}
    times = {"compute": t_compute, "tensor": n_tp * costs.collective_seconds("all_reduce", msg, t, *bw["tensor"])}
    # context: K and V of the local tokens (heads split over t) go around the ring: forward, backward x2
    kv, n_cp = 2 * msg / t, m * lps * (L.cp - 1) * (4 if L.recompute == "full" else 3)
    comm["context"] = n_cp * kv
    times["context"] = n_cp * costs.collective_seconds("send", kv, 2, *bw["context"]) if L.cp > 1 else 0.0
    times["bubble"] = (t_compute + times["tensor"] + times["context"]) * bubble(p, m, L.v)
    # pipeline: activation forward and gradient backward per micro-batch and chunk; the critical path
    # carries each of the v·m chunk hops plus the p - 1 hops of fill and drain, both ways
    hop = msg / t if scatter_gather and t > 1 else msg
    n_pp = 2 * L.v * m if p > 1 else 0
    hop_s = costs.collective_seconds("send", hop, 2, *bw["pipeline"])
    if scatter_gather and t > 1:  # the receiver all-gathers the t slices over the tensor group's link
        hop_s += costs.collective_seconds("all_gather", msg, t, *bw["tensor"])
    comm["pipeline"] = n_pp * hop
    times["pipeline"] = (2 * (L.v * m + p - 1) * hop_s) if p > 1 else 0.0
    comm["data"], times["data"] = _data_parallel(n_stage, d, m, L.zero, bw["data"], t_compute,
                                                 bwd_share, overlap_dp, lps)
    result = Plan(model, cluster, layout, efficiency, model.n_params, flops, model_flops,
                  mem, stages, comm, links, times)
    if must_fit and not result.fits:
        raise ValueError(_does_not_fit(result, precision=precision, tensor_within_node=tensor_within_node))
    return result


def model_state(n_params: float, layout: Layout, precision: str = "mixed") -> dict:
    """Parameters, gradients and optimizer state per GPU of a pipeline stage holding n_params: split
    over the tp ranks, then sharded by ZeRO over the dp·cp ranks (`costs.model_state_bytes`)."""
    return costs.model_state_bytes(n_params / layout.tp, precision, layout.zero, layout.dp * layout.cp)


def _data_parallel(n_params, d, m, zero, link, t_compute, bwd_share, overlap, n_layer):
    """Bytes and exposed seconds of the data-parallel traffic: 16-bit gradients reduced, parameters
    gathered (ZeRO). The reduce can hide behind backward: ZeRO-0/1 behind the last micro-batch's,
    ZeRO-2 behind every backward, ZeRO-3 (gathers layer by layer, prefetched) behind all compute."""
    if d == 1:
        return 0.0, 0.0
    grads, one = 2 * n_params, costs.ring_bytes("reduce_scatter", 2 * n_params, d)
    rs, ag = (costs.collective_seconds(op, grads, d, *link) for op in ("reduce_scatter", "all_gather"))
    if zero <= 1:  # one all-reduce (= reduce-scatter + all-gather) per iteration
        hide = overlap * bwd_share * t_compute / m
        return 2 * one, (max(0.0, rs + ag - hide) if zero == 0 else max(0.0, rs - hide) + ag)
    if zero == 2:
        return (m + 1) * one, max(0.0, m * rs - overlap * bwd_share * t_compute) + ag
    per_layer = sum(costs.collective_seconds(op, grads / n_layer, d, *link)  # gather fwd, gather + reduce bwd
                    for op in ("all_gather", "all_gather", "reduce_scatter"))
    return 3 * m * one, max(0.0, m * n_layer * per_layer - overlap * t_compute)


def dimension_links(cluster: Cluster, layout: Layout) -> dict:
    """"intra" if every group of the dimension lies inside one node, else "inter" (ranks row-major)."""
    sizes, stride, out, g = layout.sizes(), 1, {}, cluster.gpus_per_node
    for dim in reversed(layout.order):
        span = stride * sizes[dim]  # a group's members are `stride` apart: first to last + 1 <= span
        if sizes[dim] == 1 or g % span == 0:
            out[dim] = "intra"  # groups tile the node exactly
        elif span > g:
            out[dim] = "inter"
        else:  # groups straddle node boundaries for some first ranks: check them
            firsts = (r for r in range(layout.world) if (r // stride) % sizes[dim] == 0)
            out[dim] = "inter" if any(r // g != (r + span - stride) // g for r in firsts) else "intra"
        stride = span
    return out


def validate(model: GPTSpec, cluster: Cluster, layout: Layout, tensor_within_node: bool = True) -> None:
    """ValueError naming the constraint a layout breaks and the nearest valid choice."""
    L = layout
    for name in ("dp", "tp", "pp", "cp", "v", "micro_batch", "n_micro"):
        x = getattr(L, name)
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"Layout.{name} must be a positive integer, got {x!r}")
    if L.recompute not in RECOMPUTE:
        raise ValueError(f"Layout.recompute must be one of {RECOMPUTE}, got {L.recompute!r}")
    if L.schedule not in SCHEDULES:
        raise ValueError(f"Layout.schedule must be one of {sorted(SCHEDULES)}, got {L.schedule!r}")
    if L.zero not in costs.ZERO_STAGES or isinstance(L.zero, bool):
        raise ValueError(f"Layout.zero must be 0, 1, 2 or 3, got {L.zero!r}")
    if sorted(L.order) != sorted(DIMS):
        raise ValueError(f"Layout.order must order all of {DIMS} (outermost first), got {L.order!r}")
    if L.world != cluster.world:
        rest = L.tp * L.pp * L.cp
        hint = (f"dp={cluster.world // rest}" if cluster.world % rest == 0
                else f"tp x pp x cp dividing {cluster.world}, e.g. tp={math.gcd(L.tp, cluster.world)}")
        raise ValueError(f"dp x tp x pp x cp = {L.dp} x {L.tp} x {L.pp} x {L.cp} = {L.world}, but the cluster "
                         f"has {cluster.world} GPUs; nearest valid: {hint}")
    if model.n_head % L.tp:
        raise ValueError(f"tp={L.tp} must divide n_head={model.n_head}; nearest valid: "
                         f"tp={_nearest_divisor(model.n_head, L.tp)}")
    if model.n_layer % (L.pp * L.v):
        raise ValueError(f"pp x v = {L.pp} x {L.v} must divide n_layer={model.n_layer}; nearest valid: "
                         f"pp={_nearest_divisor(model.n_layer // math.gcd(model.n_layer, L.v), L.pp)}")
    if model.seq_len % L.cp:
        raise ValueError(f"cp={L.cp} must divide seq_len={model.seq_len}; nearest valid: "
                         f"cp={_nearest_divisor(model.seq_len, L.cp)}")
    if L.v > 1 and L.schedule != "interleaved" and L.schedule in costs.PIPELINE_SCHEDULES:
        raise ValueError(f"v={L.v} model chunks need schedule='interleaved', got {L.schedule!r}; or v=1")
    if L.schedule == "interleaved" and L.n_micro % L.pp:
        raise ValueError(f"the interleaved schedule needs n_micro a multiple of pp={L.pp} (Narayanan et al. "
                         f"2021, §2.2.2), got {L.n_micro}; nearest valid: n_micro={max(1, round(L.n_micro / L.pp)) * L.pp}")
    if L.zero >= 2 and L.pp > 1:
        raise ValueError(f"zero={L.zero} shards gradients, which pipeline parallelism accumulates over "
                         f"micro-batches (DeepSpeed: ZeRO-2/3 are incompatible with pipeline parallelism); "
                         f"nearest valid: zero=1 with pp={L.pp}, or pp=1")
    if tensor_within_node and dimension_links(cluster, L)["tensor"] == "inter":
        raise ValueError(f"tensor groups of tp={L.tp} with order {L.order} span nodes of {cluster.gpus_per_node} "
                         f"GPUs (constraint: tensor parallelism inside a node, Narayanan et al. 2021 §3.2); "
                         f"nearest valid: tp={min(L.tp, cluster.gpus_per_node)} innermost in the order, "
                         f"or pass tensor_within_node=False")


def _nearest_divisor(n: int, x: int) -> int:
    return min((k for k in range(1, n + 1) if n % k == 0), key=lambda k: (abs(k - x), k))


def _does_not_fit(p: Plan, **kw) -> str:
    need, have, L = p.memory["total"], p.cluster.gpu.memory, p.layout
    tries = {"zero": [replace(L, zero=z) for z in (1, 2, 3) if z > L.zero and (z == 1 or L.pp == 1)],
             "recompute": [replace(L, recompute=r) for r in RECOMPUTE[RECOMPUTE.index(L.recompute) + 1:]],
             "sp": [replace(L, sp=True)] if L.tp > 1 and not L.sp else [],
             "micro_batch": [replace(L, micro_batch=1, n_micro=L.n_micro * L.micro_batch)] if L.micro_batch > 1 else []}
    fixes = []
    for name, layouts in tries.items():
        for alt in layouts:
            try:
                q = plan(p.model, p.cluster, alt, efficiency=p.efficiency, **kw)
            except ValueError:
                continue
            if q.fits:
                fixes.append(f"{name}={getattr(alt, name)} ({q.memory['total'] / GB:.1f} GB)")
                break
    return (f"layout needs {need / GB:.1f} GB per GPU on the {p.cluster.gpu.name} ({have / GB:.0f} GB): over by "
            f"{(need - have) / GB:.1f} GB; " + (f"changes that fit: {', '.join(fixes)}" if fixes else
                                                 "no single change fits: raise tp or pp (more model parallelism)"))


def search(model: GPTSpec, cluster: Cluster, batch: int, *, micro_batches=(1, 2, 4, 8), chunks=(1, 2, 4),
           zeros=(0, 1, 2, 3), recomputes=RECOMPUTE, cps=(1,), rank_by: str = "plan", simulate_top: int | None = None,
           **kw) -> list[Plan]:
    """Every valid layout of `batch` sequences on the cluster that fits in memory, fastest step first.
    rank_by="simulate": by course.simulate's step time (Plan.simulated) instead of the closed form, for the
    planner's fastest `simulate_top` layouts (all if None); the rest are dropped."""
    if rank_by not in ("plan", "simulate"):
        raise ValueError(f"rank_by must be 'plan' or 'simulate', got {rank_by!r}")
    n, g, found = cluster.world, cluster.gpus_per_node, []
    tps = [t for t in range(1, g + 1) if g % t == 0 and model.n_head % t == 0]
    for t in tps:
        for cp in cps:
            for p in (p for p in range(1, model.n_layer + 1) if model.n_layer % p == 0 and n % (t * p * cp) == 0):
                d = n // (t * p * cp)
                for b in micro_batches:
                    if batch % (d * b):
                        continue
                    m = batch // (d * b)
                    for v in (chunks if p > 1 else (1,)):
                        for z in zeros:
                            for rc in recomputes:
                                lay = Layout(d, t, p, cp, v, b, m, z, rc, t > 1, "interleaved" if v > 1 else "1f1b")
                                try:
                                    q = plan(model, cluster, lay, **kw)
                                except ValueError:
                                    continue
                                if q.fits:
                                    found.append(q)
    found.sort(key=lambda q: q.step)
    if rank_by == "plan":
        return found
    from .simulate import simulate
    sim_kw = {k: kw[k] for k in ("efficiency", "scatter_gather", "tensor_within_node", "overlap_dp") if k in kw}
    found = found[:simulate_top]
    for q in found:
        q.simulated = simulate(model, cluster, q.layout, **sim_kw).step
    return sorted(found, key=lambda q: q.simulated)
