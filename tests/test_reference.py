import json

import pytest

import course.reference as ref


def test_reads_recorded_runs_newest_first(tmp_path, monkeypatch):
    monkeypatch.setattr(ref, "REFERENCE_DIR", tmp_path)
    assert ref.gpu_reference("sparse_attention") is None
    assert "No GPU reference" in ref.describe("sparse_attention")
    for date, value in (("2026-01-01", 1.0), ("2026-06-01", 2.0)):
        run = {"recorded": {"gpu": "NVIDIA H200", "torch": "2.13.0", "date": date},
               "results": {"sparse_attention": {"measured": {"speedup": value}}}}
        (tmp_path / f"{date}.json").write_text(json.dumps(run))
    got = ref.gpu_reference("sparse_attention")
    assert got["measured"]["speedup"] == 2.0 and got["recorded"]["date"] == "2026-06-01"
    assert "H200" in ref.describe("sparse_attention")


def test_rejects_files_that_are_not_records(tmp_path, monkeypatch):
    monkeypatch.setattr(ref, "REFERENCE_DIR", tmp_path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="recorded"):
        ref.gpu_references()
