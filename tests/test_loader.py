"""course.loader and course.quality: memory-mapped tokens equal in-memory batches exactly; prefetching changes nothing but
timing; the quality filter's rules on hand-made documents; noise injection; bad inputs."""
import threading

import pytest
import torch

from course.data import load_dataset
from course.loader import (MemmapData, OnTheFlyData, Prefetcher, batches, noisy_inputs, open_tokens, with_latency,
                           write_tokens)
from course.quality import QualityRules, filter_documents, jaccard, minhash, near_duplicates, quality_reason, shingles

PROSE = ("The model reads the text and it learns to predict the next word with care, and that is all "
         "it has to do. ") * 6  # 126 words of ordinary prose: passes every rule


@pytest.fixture(scope="module")
def data():
    return load_dataset("char")


def test_memmap_batches_equal_in_memory_batches(data, tmp_path):
    mm = MemmapData.write(data, str(tmp_path))
    assert mm.train.dtype.name == "uint16" and len(mm.train) == len(data.train)
    for split in ("train", "val"):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for _ in range(3):
            a, b = data.batch(split, 4, 32, generator=g1), mm.batch(split, 4, 32, generator=g2)
            assert all(torch.equal(u, v) and v.dtype == torch.long for u, v in zip(a, b))


def test_on_the_fly_tokenizes_the_same_text(data):
    from course.data import load_documents, train_val_split
    train_text, val_text = train_val_split(load_documents("pydoc"))
    fly = OnTheFlyData(train_text, val_text, data.tokenizer, chars_per_token=1)
    x, y = fly.batch("train", 2, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert data.tokenizer.decode(x[0].tolist()) in train_text  # a real window of the training text


def test_prefetch_yields_the_same_batches_in_the_same_order(data):
    sync = batches(data, 4, 16, seed=1)
    with Prefetcher(batches(data, 4, 16, seed=1), depth=3) as pre:
        for step in range(6):
            if step % 2:  # validation batches in between must not shift the training stream
                assert torch.equal(pre("val")[0], sync("val")[0])
            assert all(torch.equal(a, b) for a, b in zip(pre("train"), sync("train")))
    assert not pre.thread.is_alive()


def test_prefetch_overlaps_and_reports_errors(data):
    calls = []

    def slow(split):
        calls.append(threading.current_thread().name)
        return data.batch(split, 2, 8)
    with Prefetcher(with_latency(slow, 0.0), depth=2) as pre:
        pre("train")
    assert calls[0] == "prefetch"  # prepared by the background thread

    def broken(split):
        raise KeyError("disk gone")
    pre = Prefetcher(broken)
    with pytest.raises(KeyError, match="disk gone"):
        pre("train")
    with pytest.raises(RuntimeError, match="closed"):
        pre("train")


@pytest.mark.parametrize("doc, reason", [
    (PROSE, None),
    ("too short to learn from, and the rest", "too few words"),
    ("a b c d e f g h " * 10 + "the and", "mean word length"),
    ("# the heading and # more ### " * 20, "symbol-to-word ratio"),
    ("\n".join(["- the item and that one with words here"] * 20), "bullet lines"),
    ("\n".join(["the story goes on and on, to be continued..."] * 10), "symbol-to-word ratio"),
    ("\n".join(["the story goes on and on with more…"] * 4 + ["a plain line of the text and so on"] * 4), "ellipsis lines"),
    ("1234 5678 9012 3456 " * 20 + "the and that with have be to of words here", "words without letters"),
    ("lorem ipsum dolor sit amet consectetur adipiscing elit " * 10, "too few stop words"),
])
def test_quality_rules(doc, reason):
    assert quality_reason(doc) == reason
    assert quality_reason(doc, QualityRules(*[None] * 9)) is None  # every rule switched off


def test_exact_and_near_duplicates():
    other = ("A different passage about the weather, and that is cold with rain to be expected today "
             "in the north. ") * 5
    near = PROSE.replace("care", "caution", 1)  # one word changed: 5 new 5-word shingles
    s = len(shingles(PROSE))  # 23 distinct shingles (the sentence repeats): Jaccard s / (s + 5)
    assert jaccard(shingles(PROSE), shingles(near)) == s / (s + 5) > 0.8
    kept, report = filter_documents([PROSE, other, "  " + PROSE.replace(" ", "\n"), near, "too short"])
    assert kept == [PROSE, other]
    assert report == {"exact duplicate": 1, "too few words": 1, "near duplicate": 1}
    assert near_duplicates([PROSE, other]) == {}


def test_minhash_estimates_jaccard():
    a, b = set(range(0, 300)), set(range(100, 400))  # Jaccard 200/400 = 0.5
    sa, sb = minhash(a, 256), minhash(b, 256)
    # each of 256 hashes agrees with probability 0.5: std of the estimate sqrt(0.25/256) = 0.031; 5 sigma
    assert abs((sa == sb).mean() - 0.5) < 5 * 0.031


def test_noisy_inputs(data):
    clean = batches(data, 64, 32, seed=0)
    noisy = noisy_inputs(batches(data, 64, 32, seed=0), 0.25, data.tokenizer.vocab_size, seed=0, low=5)
    (x0, y0), (x1, y1) = clean("train"), noisy("train")
    assert torch.equal(y0, y1) and torch.equal(clean("val")[0], noisy("val")[0])
    changed = (x0 != x1).float().mean().item()  # p·(1 - 1/V') of 2048 tokens; V' = 103: 0.248, std 0.01
    assert abs(changed - 0.25 * (1 - 1 / 103)) < 0.05


def test_bad_inputs(data, tmp_path):
    path = str(tmp_path / "t.bin")
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokens(path, [1, 2, 300], vocab_size=256)
    with pytest.raises(ValueError, match="non-empty"):
        write_tokens(path, [], vocab_size=256)
    with pytest.raises(ValueError, match="not a token file"):
        open_tokens(str(tmp_path / "missing.bin"))
    write_tokens(path, list(range(100)), vocab_size=256)
    with open(path, "r+b") as f:
        f.truncate(50)
    with pytest.raises(ValueError, match="truncated"):
        open_tokens(path)
    mm = MemmapData.write(data, str(tmp_path / "mm"))
    for kw, name in ((dict(split="test"), "split"), (dict(batch_size=0), "batch_size"),
                     (dict(block_size=10 ** 7), "block_size")):
        args = {"split": "train", "batch_size": 2, "block_size": 8, **kw}
        with pytest.raises(ValueError, match=name):
            mm.batch(**args)
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda s: None, depth=0)
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates([PROSE], threshold=0)
    with pytest.raises(ValueError, match="doc"):
        quality_reason(None)
    with pytest.raises(ValueError, match="p must"):
        noisy_inputs(lambda s: None, 1.0, 10)
    with pytest.raises(ValueError, match="seconds"):
        with_latency(lambda s: None, -1)
    with pytest.raises(ValueError, match="chars_per_token"):
        OnTheFlyData("abc" * 100, "abc" * 100, data.tokenizer, chars_per_token=0)


def test_filter_removes_the_injected_bad_data():
    from course.lessons.throughput import _split_docs, pollute
    docs, _ = _split_docs()
    polluted = pollute(docs, seed=0)
    assert polluted == pollute(docs, seed=0) and len(polluted) == len(docs) + 210  # deterministic
    kept, report = filter_documents(polluted)
    bad = [d for d in polluted if d not in docs]
    survivors = [d for d in kept if d not in docs]  # at most one member of the copy cluster stays
    assert len(survivors) <= 1 and all(d in bad for d in survivors)
    assert sum(report.values()) == len(polluted) - len(kept)
