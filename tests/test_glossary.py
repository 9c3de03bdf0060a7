"""The Chinese-English glossary: complete entries, no duplicates, every entry pointing to a lesson of the
chapter list (and to its notebook once it exists), README's section generated from the module, and each
lesson's first cell linking exactly its terms (tools/link_glossary.py)."""
import re
import sys
from pathlib import Path

import nbformat
import pytest

from course import glossary as g

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import link_glossary  # noqa: E402

CJK = re.compile(r"[\u4e00-\u9fff]")


def _notebook(lesson):
    return ROOT / "notebooks" / f"{g.LESSONS[lesson]}.ipynb"


@pytest.mark.parametrize("term", g.TERMS, ids=[t.en for t in g.TERMS])
def test_each_entry_has_english_chinese_a_definition_and_a_lesson(term):
    assert term.en.strip() and term.en == term.en.strip()
    assert CJK.search(term.zh) or term.zh.startswith(("AdamW", "FlashAttention")), term.zh
    assert term.definition.endswith(".") and "\n" not in term.definition and "|" not in term.definition
    assert 20 <= len(term.definition) <= 160, term.definition  # one line
    assert term.lesson in g.LESSONS, f"{term.en}: lesson {term.lesson!r} is not in the chapter list"


def test_no_duplicate_terms():
    for key in (lambda t: t.en.lower(), lambda t: t.zh, g.anchor):
        values = [key(t) for t in g.TERMS]
        assert len(values) == len(set(values)), sorted(v for v in values if values.count(v) > 1)


def test_the_glossary_covers_every_chapter_and_the_terms_the_issue_names():
    assert len(g.TERMS) >= 60
    for lesson in g.LESSONS:
        assert len(g.terms_in(lesson)) >= 3, lesson
    named = {"数据并行": "data parallelism", "模型并行": "model parallelism", "张量并行": "tensor parallelism",
             "流水线并行": "pipeline parallelism", "激活检查点 / 重计算": "activation checkpointing / recomputation",
             "稀疏注意力": "sparse attention", "掩码语言模型 (MLM)": "masked language model (MLM)",
             "混合精度": "mixed precision", "梯度累积": "gradient accumulation", "学习率预热": "learning-rate warmup"}
    for zh, en in named.items():
        assert g.lookup(en).zh == zh


def test_the_chapter_list_names_every_lesson_notebook():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert g.LESSONS.get(path.name[:2]) == path.stem, f"{path.name} is not in course.glossary.LESSONS"


@pytest.mark.parametrize("term", g.TERMS, ids=[t.en for t in g.TERMS])
def test_each_entry_points_to_an_existing_lesson_that_mentions_it(term):
    path = _notebook(term.lesson)
    if not path.exists():
        pytest.skip(f"lesson {term.lesson} (notebooks/{path.name}) is not written yet")
    text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells).lower()
    names = (term.en, *term.aliases)
    assert any(n.lower() in text for n in names), f"notebooks/{path.name} never mentions any of {names}"


def test_readme_glossary_section_is_generated_from_the_module():
    section = g.readme_section((ROOT / "README.md").read_text())
    assert section is not None, "README.md has no '## Glossary' section: python -m course.glossary --readme"
    assert section.rstrip("\n") == g.markdown().rstrip("\n"), "README's glossary is stale: python -m course.glossary --readme"


def test_the_markdown_has_one_row_and_anchor_per_term():
    md = g.markdown()
    assert md.startswith(g.HEADING + "\n")
    for t in g.TERMS:
        assert md.count(f'<a id="{g.anchor(t)}"></a>{t.en} | {t.zh} |') == 1


def test_lookup_and_terms_in_reject_unknown_names():
    with pytest.raises(KeyError, match="not in the glossary"):
        g.lookup("warp drive")
    with pytest.raises(ValueError, match="lesson must be one of"):
        g.terms_in("99")


@pytest.mark.parametrize("lesson", sorted(g.LESSONS))
def test_each_lesson_links_exactly_its_terms_to_the_glossary(lesson):
    path = _notebook(lesson)
    if not path.exists():
        pytest.skip(f"lesson {lesson} (notebooks/{path.name}) is not written yet")
    nb = nbformat.read(path, as_version=4)
    linked = link_glossary.linked_anchors(link_glossary.first_markdown(nb).source)
    assert linked, f"{path.name}: no 'Terms in this lesson' line; run python tools/link_glossary.py {lesson}"
    known = {g.anchor(t) for t in g.TERMS}
    assert set(linked) <= known, f"{path.name} links terms not in the glossary: {set(linked) - known}"
    assert linked == [g.anchor(t) for t in g.terms_in(lesson)], f"run python tools/link_glossary.py {lesson}"
    assert not link_glossary.apply(nb, lesson)


def test_the_link_tool_inserts_then_updates_one_line_and_nothing_else():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_markdown_cell("# 03 · title\n\nwhy."),
                                         nbformat.v4.new_markdown_cell("## 1. more")])
    assert link_glossary.apply(nb, "03") is True
    first = nb.cells[1].source
    assert first.startswith("# 03 · title\n\nwhy.\n\n**Terms in this lesson**")
    assert link_glossary.linked_anchors(first) == [g.anchor(t) for t in g.terms_in("03")]
    assert link_glossary.apply(nb, "03") is False  # idempotent
    nb.cells[1].source = first.replace("term-sparse-attention", "term-old-name") + "\n\nafter."
    assert link_glossary.apply(nb, "03") is True
    assert nb.cells[1].source == first + "\n\nafter."  # the line replaced in place, the rest kept
    assert [c.source for c in (nb.cells[0], nb.cells[2])] == ["x = 1", "## 1. more"]
    for t in g.terms_in("03"):
        assert f"[{t.en} · {t.zh}](../README.md#{g.anchor(t)})" in first
