import pytest
import torch

from course.data import (BPETokenizer, CharTokenizer, SPECIAL_TOKENS, load_corpus, load_dataset,
                         train_val_split)


def test_pydoc_corpus_is_real_english_and_fixed():
    text = load_corpus("pydoc")
    assert len(text) > 400_000
    assert "The \"assert\" statement" in text and " the " in text
    assert load_corpus("pydoc") == text


def test_split_is_deterministic_disjoint_and_about_the_fraction():
    docs = tuple(f"Document {i}. " * 50 + f"\n\nSecond paragraph {i}." * 20 for i in range(40))
    train, val = train_val_split(docs, 0.1)
    assert train_val_split(docs, 0.1) == (train, val)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.2
    assert "Document 9." in val and "Document 9." not in train


def test_char_tokenizer_round_trip_and_specials():
    tok = CharTokenizer.train("hello world")
    assert tok.decode(tok.encode("low hello")) == "low hello"
    assert tok.encode("z") == [tok.unk_id]
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(set("hello world"))
    assert tok.decode([tok.mask_id]) == "[MASK]"
    assert min(tok.encode("hello")) >= len(SPECIAL_TOKENS)


def test_bpe_learns_frequent_merges_and_round_trips_any_text():
    text = load_corpus("pydoc")[:60_000]
    tok = BPETokenizer.train(text, vocab_size=512)
    assert tok.vocab_size == 512
    sample = "The statement  evaluates — naïve 日本 \t\n x=1"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(text[:5000])) < 0.6 * len(text[:5000].encode())  # merges compress
    assert BPETokenizer.train(text, vocab_size=512).merges == tok.merges  # deterministic


def test_dataset_batches_are_shifted_windows():
    data = load_dataset("char")
    g = torch.Generator().manual_seed(0)
    x, y = data.batch("train", 4, 32, generator=g)
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert data.tokenizer.decode(data.val[:200].tolist()) in load_corpus("pydoc")


@pytest.mark.parametrize("kwargs,name", [(dict(tokenizer="word"), "tokenizer"), (dict(source="web"), "source"),
                                         (dict(val_fraction=0.9), "val_fraction")])
def test_bad_dataset_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        load_dataset(**kwargs)


def test_bad_tokenizer_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("abc", vocab_size=100)
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer.train("")
    with pytest.raises(ValueError, match="split"):
        load_dataset("char").batch("test", 2, 8)
