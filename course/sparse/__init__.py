"""Sparse attention: patterns, a block-sparse kernel that trains on CPU, FlexAttention, costs."""
from .patterns import (PATTERNS, SparsePattern, alternating_dense_banded, bigbird, causal, coverage_layout, dense,
                       dilated, fixed, global_tokens, longformer, make_pattern, random_blocks, sliding_window, strided,
                       union)
from .block_sparse import BlockSparseAttention, block_sparse_attention, plan, sparse_attention_maps
