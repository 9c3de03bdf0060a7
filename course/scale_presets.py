"""Presets for the planner (course.scale), each from its source: models, GPUs, nodes, published results.

    gpt3("175B")                 -> GPTSpec of Brown et al. 2020, Table 2.1
    cluster("dgx-a100", nodes=128) -> Cluster: 1,024 A100 in DGX A100 nodes
    MEGATRON_TABLE1, MEGATRON_TABLE2 -> Narayanan et al. 2021's measured throughput, row by row

Link bandwidths are per GPU and per direction (what one rank can send while it receives as much):
NVIDIA quotes NVLink as the total of both directions, so 600 GB/s of NVLink 3 is 300 GB/s each way;
a node's InfiniBand is shared by its GPUs (DGX A100: 8 HDR ports of 200 Gb/s, one per GPU, 25 GB/s each).
Latencies are assumptions (stated, not measured here): 2 µs per ring step inside a node, 5 µs across
nodes, the order of NCCL's small-message latency; they matter only for small messages.
Memory: the data-sheet capacity at 10^9 bytes per GB (80 GB A100/H100 parts hold 80 GiB, a little more).
The planner keeps no allowance for the CUDA context, allocator fragmentation, communication buffers or
temporaries (a few GB together): read a layout within a few GB of the line as not fitting.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from .costs import PEAK_FLOPS, gpt_params

GB = 1e9


@dataclass(frozen=True)
class GPTSpec:
    """A GPT layout (pre-LN, learned positions, tied head, biases): what the planner needs of a model."""
    name: str
    n_layer: int
    d_model: int
    n_head: int
    vocab: int = 50257
    seq_len: int = 2048
    batch_tokens: float | None = None  # published batch size in tokens (GPT-3 Table 2.1)
    lr: float | None = None
    source: str = ""

    @property
    def n_params(self) -> int:
        return gpt_params(self.n_layer, self.d_model, self.vocab, self.seq_len)

    @property
    def matmul_params(self) -> int:
        """Weights that multiply activations: 12lh² + Vh (the tied head counts once; PaLM's N)."""
        return 12 * self.n_layer * self.d_model ** 2 + self.vocab * self.d_model


# Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1: n_params, n_layers, d_model,
# n_heads, d_head, batch size (tokens), learning rate; context 2048 tokens, GPT-2's 50,257-token BPE (§2.1).
# n_params as printed (nominal: the 175B layout counts 174.6B, Medium counts 356M).
# 13B: the table prints d_model 5140 while n_heads·d_head = 40·128 = 5120; kept as printed (5140 gives
# the printed 13.0B, 5120 would give 12.9B).
GPT3_TABLE = {  # name: (n_params printed, n_layer, d_model, n_head, d_head, batch tokens, lr)
    "Small": (125e6, 12, 768, 12, 64, 0.5e6, 6.0e-4),
    "Medium": (350e6, 24, 1024, 16, 64, 0.5e6, 3.0e-4),
    "Large": (760e6, 24, 1536, 16, 96, 0.5e6, 2.5e-4),
    "XL": (1.3e9, 24, 2048, 24, 128, 1e6, 2.0e-4),
    "2.7B": (2.7e9, 32, 2560, 32, 80, 1e6, 1.6e-4),
    "6.7B": (6.7e9, 32, 4096, 32, 128, 2e6, 1.2e-4),
    "13B": (13.0e9, 40, 5140, 40, 128, 2e6, 1.0e-4),
    "175B": (175.0e9, 96, 12288, 96, 128, 3.2e6, 0.6e-4),
}

# Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
# Table 1 (weak scaling, A100 80 GB on Selene, V = 51,200, s = 2048, full recomputation):
# (billions of parameters, heads, hidden, layers, t, p, GPUs, batch, achieved TFLOP/s per GPU,
#  % of peak, aggregate PFLOP/s)
MEGATRON_TABLE1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44, 4.4),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44, 8.8),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46, 18.2),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43, 34.6),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44, 70.8),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45, 143.8),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47, 227.1),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50, 297.4),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52, 410.2),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52, 502.0),
]
MEGATRON_VOCAB = 51200

# Narayanan et al. 2021, Table 2, PTD-P rows for the 174.6B model (t = 8, p = 12, micro-batch 1, batch
# 1536): (GPUs, achieved TFLOP/s per GPU, training days for 300B tokens) — their strong scaling.
MEGATRON_TABLE2_175B = [(384, 153, 84), (768, 149, 43), (1536, 141, 23)]
# Table 2, ZeRO-3 rows for the same model without model parallelism (DeepSpeed, batch 1536):
# (GPUs, micro-batch size, achieved TFLOP/s per GPU, training days for 300B tokens).
MEGATRON_TABLE2_ZERO3_175B = [(384, 4, 144, 90), (768, 2, 88, 74), (1536, 1, 44, 74)]


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense 16-bit tensor-core FLOP/s (course.costs.PEAK_FLOPS)
    memory: float  # bytes
    source: str


GPUS = {  # NVIDIA data sheets, SXM parts
    "V100": GPU("V100", PEAK_FLOPS["V100"], 32 * GB, "V100 SXM2 32 GB, 125 TFLOP/s fp16 tensor (V100 data sheet)"),
    "A100": GPU("A100", PEAK_FLOPS["A100"], 80 * GB, "A100 SXM 80 GB, 312 TFLOP/s bf16 dense (A100 data sheet)"),
    "H100": GPU("H100", PEAK_FLOPS["H100"], 80 * GB, "H100 SXM 80 GB, 989 TFLOP/s bf16 dense (H100 data sheet)"),
    "H200": GPU("H200", PEAK_FLOPS["H200"], 141 * GB, "H200 SXM 141 GB, 989 TFLOP/s bf16 dense (H200 data sheet)"),
}


@dataclass(frozen=True)
class Cluster:
    """Nodes of gpus_per_node GPUs; bandwidths per GPU per direction (bytes/s), latencies per ring step (s)."""
    gpu: GPU
    gpus_per_node: int
    nodes: int
    intra_bw: float
    inter_bw: float
    intra_latency: float = 2e-6
    inter_latency: float = 5e-6
    name: str = ""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


NODES = {  # name: (GPU, GPUs per node, NVLink GB/s per GPU both directions, InfiniBand Gb/s per node, source)
    "dgx1-v100": ("V100", 8, 300, 4 * 100, "DGX-1 with V100: NVLink 2, 300 GB/s per GPU; 4x 100 Gb/s EDR InfiniBand"),
    "dgx-a100": ("A100", 8, 600, 8 * 200, "DGX A100: NVLink 3, 600 GB/s per GPU; 8x 200 Gb/s HDR InfiniBand"),
    "dgx-h100": ("H100", 8, 900, 8 * 400, "DGX H100: NVLink 4, 900 GB/s per GPU; 8x 400 Gb/s NDR InfiniBand"),
    "dgx-h200": ("H200", 8, 900, 8 * 400, "DGX H200: NVLink 4, 900 GB/s per GPU; 8x 400 Gb/s NDR InfiniBand"),
}


def cluster(node: str, nodes: int, **overrides) -> Cluster:
    """A cluster of `nodes` DGX-like nodes; overrides replace any Cluster field (e.g. inter_bw=...)."""
    if node not in NODES:
        raise ValueError(f"unknown node preset {node!r}; known: {sorted(NODES)}{_closest(node, NODES)}")
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ValueError(f"nodes must be a positive integer, got {nodes!r}")
    gpu, g, nvlink, ib, _ = NODES[node]
    fields = dict(gpu=GPUS[gpu], gpus_per_node=g, nodes=nodes, intra_bw=nvlink / 2 * GB,
                  inter_bw=ib / 8 / g * GB, name=f"{nodes} x {node}")
    unknown = set(overrides) - set(Cluster.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown Cluster field(s) {sorted(unknown)}; fields: {list(Cluster.__dataclass_fields__)}")
    return Cluster(**{**fields, **overrides})


def gpt3(name: str) -> GPTSpec:
    """One of the eight GPT-3 sizes of Brown et al. 2020, Table 2.1 ("Small" ... "175B")."""
    if name not in GPT3_TABLE:
        raise ValueError(f"unknown GPT-3 size {name!r}; Table 2.1 has {list(GPT3_TABLE)}{_closest(name, GPT3_TABLE)}")
    _, l, h, a, _, tokens, lr = GPT3_TABLE[name]
    return GPTSpec(f"GPT-3 {name}", l, h, a, batch_tokens=tokens, lr=lr, source="Brown et al. 2020, Table 2.1")


def megatron_spec(row) -> GPTSpec:
    """The model of one row of Narayanan et al. 2021, Table 1 (V = 51,200, s = 2048)."""
    billions, a, h, l = row[:4]
    return GPTSpec(f"Megatron {billions}B", l, h, a, vocab=MEGATRON_VOCAB, source="Narayanan et al. 2021, Table 1")


def _closest(name, options) -> str:
    near = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.3)
    return f"; did you mean {near[0]!r}?" if near else ""
