"""Glossary · 术语表: every technical term of the course in English and Chinese, with a one-line
definition and the lesson where it is built.

The course grew from a Chinese essay and many of its readers read Chinese. How the Chinese terms were
chosen: for each term, the word the Chinese ML community uses for it today, taken from
- the Chinese edition of Dive into Deep Learning (《动手学深度学习》, Zhang et al.): 词元 (token),
  自注意力, 多头注意力, 缩放点积注意力, 困惑度, 层规范化/层归一化, 残差连接, 微调, 预训练;
- the Chinese write-ups and translations of the Megatron-LM and DeepSpeed papers and documentation
  (Zhihu columns, the DeepSpeed Chinese blog): 数据并行, 模型并行, 张量并行, 流水线并行, 序列并行,
  上下文并行, 激活重计算 / 激活检查点, 选择性重计算, 零冗余优化器 (ZeRO), 全分片数据并行 (FSDP),
  流水线气泡, 微批次, 混合精度, 梯度累积, 学习率预热, 梯度裁剪;
- NCCL / MPI usage in Chinese for collectives: 集合通信, 全规约 (AllReduce), 规约散射 (ReduceScatter),
  全收集 (AllGather), where "规约" renders reduction as in MPI_Reduce.
Where Chinese text mostly keeps the English name (token, rank, AllReduce, 1F1B, FlashAttention, MFU),
the entry gives the Chinese term in use and keeps the English name in parentheses, so a reader can
search for either. Where two renderings are common, both are given ("激活检查点 / 重计算").

`TERMS` is the data; `markdown()` renders the README's "Glossary" section (`python -m course.glossary
--markdown` prints it, `--readme` writes it into README.md), `terms_in(lesson)` lists what a lesson's
first cell links (tools/link_glossary.py), and `anchor(term)` is each row's link target.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# The chapter list: lesson id -> notebook name (notebooks/<name>.ipynb). 06-11 are being written.
LESSONS = {
    "00": "00_tour", "01": "01_attention", "02": "02_bert_vs_gpt", "03": "03_sparse_attention",
    "04": "04_activation_checkpointing", "05": "05_data_parallelism",
    "06": "06_tensor_and_context_parallelism", "07": "07_pipeline_parallelism", "08": "08_gpt3_at_scale",
    "09": "09_training_stability", "10": "10_vit_clip_sam", "11": "11_flash_attention",
}


@dataclass(frozen=True)
class Term:
    en: str
    zh: str
    lesson: str  # where it is built, a key of LESSONS
    definition: str
    aliases: tuple[str, ...] = ()  # other spellings a lesson's text uses (English)


def _t(en, zh, lesson, definition, *aliases):
    return Term(en, zh, lesson, definition, tuple(aliases))


TERMS: tuple[Term, ...] = (
    # 00 tour
    _t("token", "词元 (token)", "00", "The unit a language model reads and predicts: a character, a byte or a merged piece of text.", "tokens"),
    _t("tokenizer", "分词器", "00", "Maps text to a sequence of token ids and back.", "tokenized", "tokenizers"),
    _t("byte-pair encoding (BPE)", "字节对编码 (BPE)", "00", "A tokenizer that starts from bytes and repeatedly merges the most frequent adjacent pair into a new token.", "BPE"),
    _t("next-token prediction", "下一个词元预测", "00", "The GPT objective: at every position, predict the token that follows.", "next-token"),
    _t("cross-entropy loss", "交叉熵损失", "00", "Minus the log-probability the model gives the true token, averaged; measured in nats.", "cross-entropy"),
    _t("embedding", "嵌入 (词嵌入)", "00", "A learned vector per token id (and per position) that the transformer starts from.", "embeddings"),
    _t("layer normalization", "层归一化 (层规范化)", "00", "Normalises each token's features to zero mean and unit variance, then scales and shifts them.", "LayerNorm"),
    _t("pre-LN transformer block", "前置层归一化块 (Pre-LN)", "00", "A block that normalises before attention and before the MLP, adding each result to the residual stream (GPT-2).", "pre-LayerNorm"),
    _t("residual connection", "残差连接", "00", "Adding a sublayer's output back to its input, so signals and gradients pass through deep stacks.", "residual"),
    _t("weight tying", "权重共享 (词嵌入绑定)", "00", "Using the token-embedding matrix as the output layer's weights.", "tied"),
    _t("AdamW", "AdamW 优化器 (解耦权重衰减)", "00", "Adam with weight decay applied directly to the weights instead of through the gradient."),
    _t("training compute (6ND)", "训练计算量 (6ND)", "00", "About 6 FLOPs per parameter per training token: 2 for the forward multiply-add, 4 for the backward.", "6·N·D"),
    _t("temperature sampling", "温度采样", "00", "Sampling the next token from softmax(logits / T): T < 1 sharpens, T > 1 flattens the distribution.", "temperature"),
    _t("top-k sampling", "top-k 采样", "00", "Sampling only among the k most likely next tokens.", "top_k"),
    # 01 attention
    _t("self-attention", "自注意力", "01", "Every position mixes the values of all positions it may see, weighted by query-key similarity.", "attention"),
    _t("scaled dot-product attention", "缩放点积注意力", "01", "softmax(QKᵀ / sqrt(d_k) + M) V, the attention of Vaswani et al. 2017.", "scaled_dot_product_attention"),
    _t("query, key, value", "查询、键、值 (Q/K/V)", "01", "Three linear maps of each position: queries score keys, and the scores weight the values.", "query", "key"),
    _t("multi-head attention", "多头注意力", "01", "Several attention heads in parallel on slices of the width, concatenated and projected.", "heads", "head"),
    _t("causal mask", "因果掩码", "01", "The lower-triangular mask that lets position i attend only positions j <= i.", "causal"),
    _t("attention mask", "注意力掩码", "01", "A boolean matrix saying which (query, key) pairs may attend; the rest get -inf scores.", "mask"),
    _t("softmax", "softmax (归一化指数函数)", "01", "exp(s_j) / sum_k exp(s_k): turns a row of scores into weights that sum to 1."),
    _t("attention map", "注意力图", "01", "The T × T matrix of attention weights of one head, drawn as a heatmap.", "attention maps", "attention_maps"),
    _t("quadratic cost of attention", "注意力的二次复杂度", "01", "Scores for every (query, key) pair: T² entries per head, in time and memory.", "O(n²)", "quadratic"),
    # 02 BERT vs GPT
    _t("language model", "语言模型", "02", "A model of the probability of text: GPT predicts each next token, BERT masked ones.", "language modelling"),
    _t("masked language model (MLM)", "掩码语言模型 (MLM)", "02", "BERT's objective: corrupt about 15% of the tokens and predict the originals from both sides.", "masked-language", "MLM"),
    _t("causal decoder", "因果解码器 (仅解码器)", "02", "A transformer whose positions see only their left context; GPT is one.", "decoder"),
    _t("bidirectional encoder", "双向编码器", "02", "A transformer whose positions see the whole sequence; BERT is one.", "bidirectional"),
    _t("prefix language model", "前缀语言模型", "02", "Bidirectional attention inside a prefix, causal after it (UniLM, T5).", "prefix LM", "prefix"),
    _t("perplexity", "困惑度", "02", "exp(mean cross-entropy): the effective number of equally likely next tokens."),
    _t("cloze test", "完形填空", "02", "Fill in a blanked-out token using the context on both sides.", "cloze"),
    _t("special tokens", "特殊词元", "02", "Reserved ids such as [CLS], [SEP], [MASK] and [PAD].", "[MASK]", "[CLS]"),
    _t("pre-training", "预训练", "02", "Training on unlabelled text with a self-supervised objective, before any task-specific training.", "pretrained", "pre-trained"),
    # 03 sparse attention
    _t("sparse attention", "稀疏注意力", "03", "Attention that scores only a pattern of (query, key) pairs instead of all T².", "sparsity"),
    _t("sliding-window attention", "滑动窗口注意力 (局部注意力)", "03", "Each query attends the keys within a fixed distance: the locally banded pattern.", "sliding window", "locally banded", "local"),
    _t("global attention", "全局注意力", "03", "A few tokens that attend everywhere and are attended from everywhere.", "global"),
    _t("block-sparse attention", "块稀疏注意力", "03", "Sparsity decided per tile of queries × keys, so kernels skip whole blocks.", "block-sparse"),
    _t("dilated sliding window", "空洞滑动窗口 (扩张窗口)", "03", "A sliding window that keeps every d-th key, to see further with as many keys (Longformer).", "dilated"),
    _t("strided attention", "跨步注意力", "03", "The Sparse Transformer pattern: the previous l keys plus every l-th key before them.", "strided"),
    _t("random attention", "随机注意力", "03", "Each query block also attends a few randomly chosen key blocks (BigBird).", "random"),
    # 04 activation recomputation
    _t("activations", "激活值", "04", "The tensors the forward pass keeps because backward needs them.", "activation"),
    _t("activation checkpointing / recomputation", "激活检查点 / 重计算", "04", "Keep only some activations and recompute the rest during backward: memory for compute.", "checkpointing", "recomputation", "recompute"),
    _t("selective recomputation", "选择性重计算", "04", "Recompute only the cheap, large activations, such as the attention core's s × s tensors (Korthikanti et al. 2022).", "selective"),
    _t("full recomputation", "完全重计算", "04", "Checkpoint every block: keep each block's input, recompute everything else (about one extra forward).", "full"),
    _t("sqrt(n) checkpointing", "√n 检查点 (亚线性内存)", "04", "Segments of √n blocks: about 2√n layers of memory for one extra forward (Chen et al. 2016).", "sqrt"),
    _t("backward pass", "反向传播", "04", "Computing the gradients of the loss by the chain rule, from the output back to the inputs.", "backward"),
    _t("peak memory", "峰值内存 (峰值显存)", "04", "The largest amount of memory alive at any moment of a training step.", "peak"),
    # 05 data parallelism, ZeRO, FSDP
    _t("data parallelism", "数据并行", "05", "Every rank holds the whole model and trains on its own slice of the batch; gradients are averaged.", "data parallel", "data-parallel"),
    _t("rank", "进程号 (rank)", "05", "One process of a distributed job, numbered 0 to world size − 1.", "ranks"),
    _t("collective communication", "集合通信", "05", "Operations in which every rank of a group takes part, such as all-reduce.", "collective", "communication"),
    _t("all-reduce", "全规约 (AllReduce)", "05", "Every rank ends with the sum of all ranks' tensors.", "all_reduce", "allreduce"),
    _t("reduce-scatter", "规约散射 (ReduceScatter)", "05", "Every rank ends with its 1/N slice of the sum.", "reduce_scatter"),
    _t("all-gather", "全收集 (AllGather)", "05", "Every rank ends with the concatenation of all ranks' slices.", "all_gather"),
    _t("ring all-reduce", "环形全规约 (Ring AllReduce)", "05", "An all-reduce in which each rank sends 2(N−1)/N of the data around a ring.", "ring"),
    _t("gradient bucketing", "梯度分桶", "05", "Grouping gradients into buckets of a few MB so each all-reduce is large and can start early.", "bucketed", "buckets", "bucket"),
    _t("communication–computation overlap", "通信与计算重叠", "05", "Running a bucket's all-reduce while backward still computes earlier layers.", "overlap"),
    _t("gradient accumulation", "梯度累积", "05", "Summing the gradients of several micro-batches before one optimizer step.", "accumulation"),
    _t("optimizer state", "优化器状态", "05", "What the optimizer keeps per parameter: AdamW's momentum and variance (and fp32 master weights).", "optimizer"),
    _t("ZeRO", "零冗余优化器 (ZeRO)", "05", "Shard optimizer state (stage 1), gradients (2) and parameters (3) over the data-parallel ranks (Rajbhandari et al. 2020)."),
    _t("sharding", "分片", "05", "Splitting a tensor or a state across ranks so each holds 1/N of it.", "shard", "shards", "sharded"),
    _t("fully sharded data parallel (FSDP)", "全分片数据并行 (FSDP)", "05", "PyTorch's ZeRO-3: parameters gathered just before use and freed after.", "FSDP"),
    # 06 tensor / sequence / context parallelism
    _t("model parallelism", "模型并行", "06", "Splitting one model's layers or tensors over devices, so none holds the whole model."),
    _t("tensor parallelism", "张量并行", "06", "Splitting each layer's weight matrices over ranks, with collectives inside every layer (Megatron-LM)."),
    _t("column-parallel linear", "列并行线性层", "06", "A linear layer whose output features are split over ranks; no communication in forward."),
    _t("row-parallel linear", "行并行线性层", "06", "A linear layer whose input features are split over ranks; an all-reduce sums the partial outputs."),
    _t("sequence parallelism", "序列并行", "06", "Splitting the sequence dimension of the LayerNorm and dropout activations over the tensor-parallel ranks (Korthikanti et al. 2022)."),
    _t("context parallelism", "上下文并行", "06", "Splitting the sequence over ranks for attention too, exchanging keys and values between them."),
    _t("ring attention", "环形注意力", "06", "Context-parallel attention in which key/value blocks travel around a ring of ranks."),
    # 07 pipeline parallelism
    _t("pipeline parallelism", "流水线并行", "07", "Splitting the layers into stages on different devices; micro-batches flow through them."),
    _t("micro-batch", "微批次", "07", "A slice of the batch that goes through the pipeline (or through accumulation) as one unit."),
    _t("pipeline bubble", "流水线气泡", "07", "Time a stage sits idle while the pipeline fills and drains."),
    _t("GPipe schedule", "GPipe 调度", "07", "All micro-batches' forwards, then all backwards (Huang et al. 2019)."),
    _t("1F1B schedule", "1F1B 调度 (一前一后)", "07", "After a warm-up, each stage alternates one forward and one backward, keeping at most p − s micro-batches in flight."),
    _t("interleaved pipeline schedule", "交错式流水线调度 (虚拟流水线)", "07", "Each device holds several non-adjacent stages, which shrinks the bubble by that factor (Narayanan et al. 2021)."),
    # 08 3D parallelism, GPT-3 at scale
    _t("3D parallelism", "3D 并行 (三维并行)", "08", "Data, tensor and pipeline parallelism combined on one grid of ranks."),
    _t("device mesh", "设备网格", "08", "The ranks laid out as a grid with one named dimension per kind of parallelism."),
    _t("interconnect bandwidth", "互连带宽", "08", "Bytes per second between devices: NVLink inside a node, InfiniBand between nodes."),
    _t("scaling laws", "缩放定律 (规模定律)", "08", "Power laws relating loss to parameters, data and compute (Kaplan et al. 2020; Hoffmann et al. 2022)."),
    _t("alpha-beta model", "α-β 模型 (延迟-带宽模型)", "08", "A message of n bytes takes α + n/β: a latency plus the bytes over the bandwidth (Hockney 1994)."),
    # 09 stability, throughput, fault tolerance
    _t("learning-rate warmup", "学习率预热", "09", "Raising the learning rate linearly from near zero over the first steps.", "warmup"),
    _t("cosine learning-rate decay", "余弦学习率衰减", "09", "Lowering the learning rate along half a cosine to a minimum at the end of training.", "cosine"),
    _t("gradient clipping", "梯度裁剪", "09", "Scaling all gradients down when their global norm exceeds a threshold (1.0 for GPT-3).", "clipping"),
    _t("loss spike", "损失尖峰", "09", "A sudden jump of the training loss, a sign of instability."),
    _t("mixed precision", "混合精度", "09", "Computing in 16-bit (bf16/fp16) while keeping fp32 master weights and sensitive reductions."),
    _t("loss scaling", "损失缩放", "09", "Multiplying the loss before backward so small fp16 gradients do not underflow."),
    _t("weight initialization", "权重初始化", "09", "The distribution weights start from; GPT-2 scales residual projections by 1/sqrt(2·layers)."),
    _t("model FLOPs utilization (MFU)", "模型算力利用率 (MFU)", "09", "Useful model FLOPs per second divided by the hardware's peak (PaLM, appendix B).", "MFU"),
    _t("throughput", "吞吐量", "09", "Tokens processed per second."),
    _t("checkpoint and resume", "断点续训 (检查点保存与恢复)", "09", "Saving weights, optimizer state, data position and step so a run continues exactly after a failure."),
    _t("fault tolerance", "容错", "09", "Keeping a long run going when devices or nodes fail."),
    _t("atomic write", "原子写入", "09", "Writing to a temporary file, fsync, then renaming it: readers see the old file or the new one, never half.", "atomically"),
    _t("checksum", "校验和", "09", "A hash of a file's bytes (SHA-256 here) kept with it, so a truncated or corrupted copy is caught before use.", "SHA-256"),
    _t("distributed checkpoint (DCP)", "分布式检查点 (DCP)", "09", "Each rank writes its own shard plus shared metadata, so any number of ranks can read it back.", "distributed checkpoints", "DCP"),
    _t("resharding", "重分片", "09", "Loading a checkpoint saved under one sharding (say 4 ranks) into another (2 ranks).", "resharded"),
    _t("asynchronous checkpointing", "异步检查点", "09", "Copying the state into memory while training waits, then writing the copy to disk in the background.", "asynchronous save", "async save"),
    _t("elastic restart", "弹性重启", "09", "torchrun stopping and restarting every rank of a group after one fails, up to --max-restarts times.", "--max-restarts"),
    _t("warmup-stable-decay (WSD) schedule", "预热-稳定-衰减 (WSD) 学习率调度", "09", "Warm up, hold the peak learning rate, then cool it down in a short final phase (MiniCPM; Hägele et al. 2024).", "WSD"),
    _t("learning-rate range test", "学习率范围测试", "09", "One run with a rising learning rate whose loss curve brackets the usable rates (Smith 2017).", "range test"),
    _t("confidence interval over seeds", "跨随机种子的置信区间", "09", "Mean of a metric over seeds ± Student-t quantile × std / sqrt(n): what a comparison must beat.", "confidence interval"),
    _t("z-score spike detection", "z 分数尖峰检测", "09", "Flagging a loss more than z standard deviations above the mean of the recent good losses.", "z-score"),
    _t("rollback", "回滚", "09", "Restoring the last known-good weights and optimizer state and skipping the batches since (PaLM §5.1)."),
    _t("update-to-weight ratio", "更新量与权重之比", "09", "The norm of one step's weight change over the norm of the weights; about 1e-3 is a healthy rate.", "update/weight ratio"),
    _t("fault injection", "故障注入", "09", "Breaking a run on purpose (a NaN, a bad batch, an lr spike, a bit flip) to test detection and recovery."),
    _t("bit flip", "比特翻转", "09", "A memory error that flips one stored bit; in a float's exponent it turns 0.02 into about 7e36."),
    _t("critical batch size", "临界批量大小", "09", "The batch size beyond which larger batches stop cutting the number of steps needed (McCandlish et al. 2018)."),
    _t("overfitting", "过拟合", "09", "Training loss keeps falling while validation loss rises: the model memorises its training set."),
    _t("dropout", "暂退法 (dropout)", "09", "Zeroing random activations during training (and rescaling the rest) so no unit can be relied on alone."),
    _t("weight decay", "权重衰减", "09", "Shrinking the weights a little every step toward zero; AdamW applies it directly to the weights."),
    _t("gradient noise injection", "梯度噪声注入", "09", "Adding annealed Gaussian noise N(0, η/(1+t)^0.55) to every gradient (Neelakantan et al. 2015).", "gradient noise"),
    _t("bfloat16 (bf16)", "bfloat16 (bf16, 脑浮点)", "09", "A 16-bit float with fp32's 8 exponent bits and 8 significant bits: fp32's range, no loss scaling needed.", "bf16"),
    _t("fp16 (half precision)", "半精度浮点 (fp16)", "09", "IEEE 16-bit float: 5 exponent bits, 11 significant bits, largest value 65504.", "fp16"),
    _t("master weights", "主权重 (fp32 主副本)", "09", "The fp32 copy of the parameters the optimizer updates while compute uses 16-bit copies."),
    _t("gradient scaler", "梯度缩放器 (GradScaler)", "09", "torch.amp.GradScaler: dynamic loss scaling that skips overflowing steps and halves the scale.", "GradScaler"),
    _t("memory-mapped file", "内存映射文件", "09", "A file the OS maps into memory (numpy.memmap): reads touch only the pages used.", "memmap"),
    _t("prefetch", "预取", "09", "Preparing the next batches in the background while the current step computes."),
    _t("deduplication", "去重", "09", "Removing exact and near-duplicate documents from a training corpus (MinHash LSH).", "dedup"),
    _t("MinHash", "最小哈希 (MinHash)", "09", "A signature whose per-hash agreement probability equals the Jaccard similarity of two sets."),
    _t("quality filter", "质量过滤", "09", "Rules that drop low-quality documents (length, word length, symbols, stop words; Gopher appendix A)."),
    _t("noise injection", "噪声注入", "09", "Randomly corrupting inputs during training as a regularizer."),
    # 10 ViT, CLIP, SAM
    _t("Vision Transformer (ViT)", "视觉 Transformer (ViT)", "10", "A transformer that reads an image as a sequence of patch embeddings (Dosovitskiy et al. 2021)."),
    _t("patch embedding", "图像块嵌入 (patch 嵌入)", "10", "Cutting an image into P × P patches and mapping each flattened patch linearly to a vector."),
    _t("image patch", "图像块 (patch)", "10", "A P × P square of pixels; a ViT reads an image as the sequence of its patches, row by row.", "patches"),
    _t("2-D sin-cos position embedding", "二维正余弦位置编码", "10", "Fixed positions for a patch grid: sines and cosines of the column in half the channels, of the row in the other half.", "sin-cos"),
    _t("windowed attention", "窗口注意力", "10", "Attention restricted to non-overlapping windows of the patch grid, mixed with a few global blocks (ViTDet, SAM).", "windowed"),
    _t("global average pooling", "全局平均池化", "10", "Averaging a model's features over all positions to get one vector per image."),
    _t("image-text pair", "图文对", "10", "An image with a caption describing it: CLIP's training example."),
    _t("learned temperature", "可学习温度", "10", "CLIP's logit scale 1/τ, trained with the model, initialised at 1/0.07 and clipped at 100."),
    _t("compositional generalization", "组合泛化", "10", "Handling unseen combinations of known parts, such as a colour and a shape never seen together.", "compositional"),
    _t("contrastive learning", "对比学习", "10", "Learning embeddings that bring matching pairs together and push the others apart."),
    _t("contrastive loss (InfoNCE)", "对比损失 (InfoNCE)", "10", "Cross-entropy over the similarities of one item with every candidate, the true pair as the target (CLIP)."),
    _t("zero-shot classification", "零样本分类", "10", "Classifying images by comparing them with text prompts of class names, without training on those classes."),
    _t("promptable segmentation", "可提示分割", "10", "Producing a segmentation mask from a prompt such as a point or a box (Segment Anything)."),
    # 10, part SAM (course.vision.sam)
    _t("image segmentation", "图像分割", "10", "Labelling which pixels of an image belong to an object: the output is a mask.", "segmentation", "segmenter"),
    _t("prompt (for segmentation)", "提示 (分割提示)", "10", "What tells a promptable segmenter which object to cut out: points, a box, a rough mask or text.", "prompt", "prompts"),
    _t("mask", "掩码", "10", "A per-pixel yes/no map of an object; a model outputs logits, positive inside.", "masks"),
    _t("prompt encoder", "提示编码器", "10", "Maps points and boxes to tokens (Fourier features plus learned type embeddings) and a mask to a dense map."),
    _t("mask decoder", "掩码解码器", "10", "SAM's light two-way transformer that turns an image embedding and prompt tokens into masks and IoU scores."),
    _t("random Fourier features", "随机傅里叶特征", "10", "sin and cos of a fixed random projection of coordinates, a position code that can resolve fine detail.", "Fourier features"),
    _t("intersection over union (IoU)", "交并比 (IoU)", "10", "Area of overlap of two masks divided by the area of their union; mIoU is its mean over objects.", "IoU", "mIoU"),
    _t("interactive segmentation", "交互式分割", "10", "Refining a mask click by click, each new click placed on the model's current error.", "clicks to reach", "NoC"),
    _t("knowledge distillation", "知识蒸馏", "10", "Training a small student model to reproduce a bigger teacher's outputs or features.", "distillation", "distilled"),
    # 11 flash attention
    _t("FlashAttention", "FlashAttention (IO 感知的精确注意力)", "11", "Exact attention computed tile by tile in on-chip memory, never writing the T × T matrix (Dao et al. 2022)."),
    _t("online softmax", "在线 softmax", "11", "A softmax computed in one pass by keeping a running maximum and a rescaled running sum."),
    _t("tiling", "分块 (tiling)", "11", "Splitting a computation into tiles that fit in fast memory."),
    _t("kernel fusion", "算子融合", "11", "Doing several operations in one GPU kernel, so intermediates never go to main memory.", "fused"),
    _t("high-bandwidth memory (HBM)", "高带宽内存 (HBM)", "11", "A GPU's main memory: large, but much slower than on-chip SRAM.", "HBM"),
    _t("SRAM (on-chip memory)", "片上内存 (SRAM)", "11", "The small, fast memory inside each GPU multiprocessor where tiles are computed.", "SRAM"),
)


def anchor(term: Term) -> str:
    """The row's HTML id in README.md, e.g. 'term-data-parallelism'."""
    return "term-" + re.sub(r"[^a-z0-9]+", "-", term.en.lower()).strip("-")


def terms_in(lesson: str) -> list[Term]:
    """The terms built in `lesson`, in glossary order."""
    if lesson not in LESSONS:
        raise ValueError(f"lesson must be one of {sorted(LESSONS)}, got {lesson!r}")
    return [t for t in TERMS if t.lesson == lesson]


def lookup(name: str) -> Term:
    """The entry whose English term is `name` (case-insensitive)."""
    for t in TERMS:
        if t.en.lower() == name.lower():
            return t
    raise KeyError(f"{name!r} is not in the glossary")


HEADING = "## Glossary"


def markdown() -> str:
    """The README section: heading, one line on the choice of terms, a table per lesson order."""
    lines = [HEADING, "",
             "术语表 · Every technical term of the course in English and Chinese (the terms in common use in the "
             "Chinese ML community; how they were chosen: `course/glossary.py`), with the lesson where it is "
             "built. Each lesson's first cell links its terms here. Generated by "
             "`python -m course.glossary --readme`.", "",
             "| English | 中文 | what it is | lesson |", "|---|---|---|---|"]
    for t in sorted(TERMS, key=lambda t: t.lesson):  # stable: glossary order within a lesson
        lines.append(f"| <a id=\"{anchor(t)}\"></a>{t.en} | {t.zh} | {t.definition} | "
                     f"[{t.lesson}](notebooks/{LESSONS[t.lesson]}.ipynb) |")
    return "\n".join(lines) + "\n"


def readme_section(text: str) -> str | None:
    """The Glossary section of a README text (heading to the next '## ' heading), or None."""
    m = re.search(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    return m.group(0) if m else None


def write_readme(path: Path) -> bool:
    """Put markdown() into README.md (replace the section, or append it). True if the file changed."""
    text = path.read_text()
    old = readme_section(text)
    if old is None:
        new = text.rstrip("\n") + "\n\n" + markdown()
    else:
        start = text.index(old)
        tail = text[start + len(old):]
        new = text[:start] + markdown() + ("\n" + tail if tail else "")
    if new != text:
        path.write_text(new)
    return new != text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course.glossary", description="The course's glossary.")
    parser.add_argument("--markdown", action="store_true", help="print the README section")
    parser.add_argument("--readme", action="store_true", help="write the section into README.md")
    args = parser.parse_args(argv)
    if args.readme:
        path = Path(__file__).resolve().parent.parent / "README.md"
        print(f"{path.name}: {'updated' if write_readme(path) else 'up to date'}")
    elif args.markdown:
        sys.stdout.write(markdown())
    else:
        for t in TERMS:
            print(f"{t.lesson}  {t.en} · {t.zh}: {t.definition}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
