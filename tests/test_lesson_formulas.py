"""Formulas that lesson 06 shows, checked against an independent count or the published expressions
(docs/review/factcheck-lessons-06-08-11.md, items 06-T1 and 06-T2)."""
import math

import pytest

from course.costs import data_parallel_layer_bytes
from course.lessons.model_parallel import gpt3_layer_table
from course.model import Block, ModelConfig


@pytest.mark.parametrize("h,world", [(64, 2), (128, 8), (96, 64)])
def test_data_parallel_layer_bytes_is_the_ring_all_reduce_of_12h2(h, world):
    """12h² parameters per layer (Kaplan et al. 2020, Table 1) + 13h of biases and LayerNorms, counted on a real
    Block; a ring all-reduce sends 2(N-1)/N of them per rank (Patarasuk & Yuan 2009)."""
    block = Block(ModelConfig.gpt(n_layer=1, n_head=4, n_embd=h, block_size=16, vocab_size=32, bias=True))
    n = sum(p.numel() for p in block.parameters())
    assert data_parallel_layer_bytes(h, world, bytes_per_el=4) == pytest.approx(2 * (world - 1) / world * n * 4)


def test_gpt3_layer_table_against_narayanan_and_the_data_sheets():
    """Lesson 06's GPT-3 table (b = 1, s = 2048, h = 12288, 16-bit) from the published expressions:
    tensor parallelism sends 8·b·s·h·(t-1)/t elements per layer and micro-batch (Narayanan et al. 2021,
    section 3.2); NVLink 3 is 600 GB/s per GPU in both directions and a DGX A100 has one 200 Gb/s HDR NIC
    per GPU (NVIDIA data sheets); a layer's forward + backward is 72·b·s·h²(1 + s/6h) FLOPs (Narayanan et
    al. 2021, eq. 3 without recomputation and without the logits), at the A100's 312 TFLOP/s."""
    b, s, h, t, dp = 1, 2048, 12288, 8, 64
    rows = {r["split (one layer)"]: r for r in gpt3_layer_table(t=t, dp=dp)}
    tp = rows[f"tensor parallel, t={t}, per micro-batch"]
    tp_bytes = 8 * b * s * h * (t - 1) / t * 2
    assert math.isclose(tp["MB sent per GPU"], tp_bytes / 1e6, rel_tol=1e-12)
    assert math.isclose(tp["ms on NVLink 3 (A100, in a node)"], tp_bytes / 300e9 * 1e3, rel_tol=1e-12)
    assert math.isclose(tp["ms on InfiniBand HDR (DGX A100, between nodes)"], tp_bytes / 25e9 * 1e3, rel_tol=1e-12)
    layer_flops = 72 * b * s * h * h * (1 + s / (6 * h))
    assert math.isclose(tp["ms of compute at peak"], layer_flops / t / 312e12 * 1e3, rel_tol=1e-12)
    dp_row = rows[f"data parallel, N={dp}, per optimizer step"]
    assert math.isclose(dp_row["MB sent per GPU"], 2 * (dp - 1) / dp * (12 * h * h + 13 * h) * 2 / 1e6, rel_tol=1e-12)
    sequences = 3.2e6 / s / dp  # GPT-3's batch of 3.2M tokens (Brown et al. 2020, Table 2.1) over dp replicas
    assert math.isclose(dp_row["ms of compute at peak"], 72 * sequences * s * h * h * (1 + s / (6 * h)) / 312e12 * 1e3,
                        rel_tol=1e-12)
