"""Link each lesson's terms to the glossary: one "Terms in this lesson" line in its first markdown cell.

    python tools/link_glossary.py            # every lesson notebook in notebooks/
    python tools/link_glossary.py 03         # only these lessons
    python tools/link_glossary.py --check    # change nothing; exit 1 if a notebook is out of date

The line lists the glossary entries built in that lesson (`course.glossary.terms_in`), each linked to
its row of the README's Glossary section. An existing line (it starts with "**Terms in this lesson**")
is replaced, otherwise the line is appended to the cell; nothing else changes, and a notebook already
up to date is not rewritten. Markdown cells are not executed, so no re-execution is needed.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from course.glossary import LESSONS, anchor, terms_in  # noqa: E402

PREFIX = "**Terms in this lesson**"
README = "../README.md"  # notebooks/ -> the repository root


def line_for(lesson: str) -> str:
    links = ", ".join(f"[{t.en} · {t.zh}]({README}#{anchor(t)})" for t in terms_in(lesson))
    return f"{PREFIX} · 本课术语 ([glossary]({README}#glossary)): {links}"


def linked_anchors(source: str) -> list[str]:
    """The glossary anchors a cell's "Terms in this lesson" line links to."""
    line = next((l for l in source.splitlines() if l.startswith(PREFIX)), "")
    return re.findall(rf"\]\({re.escape(README)}#(term-[a-z0-9-]+)\)", line)


def first_markdown(nb):
    cell = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if cell is None:
        raise ValueError("the lesson has no markdown cell to link its terms from")
    return cell


def apply(nb, lesson: str) -> bool:
    """Insert or update the line in nb's first markdown cell (in place). True if nb changed."""
    cell, line = first_markdown(nb), line_for(lesson)
    lines = cell.source.splitlines()
    at = next((i for i, l in enumerate(lines) if l.startswith(PREFIX)), None)
    if at is None:
        new = cell.source.rstrip("\n") + "\n\n" + line
    else:
        new = "\n".join(lines[:at] + [line] + lines[at + 1:])
    if new == cell.source:
        return False
    cell.source = new
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lessons", nargs="*", help="lesson ids, e.g. 03 (default: every lesson notebook)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is out of date")
    args = parser.parse_args(argv)
    stale = []
    for lesson in args.lessons or sorted(LESSONS):
        if lesson not in LESSONS:
            raise SystemExit(f"unknown lesson {lesson!r}; lessons: {', '.join(LESSONS)}")
        path = ROOT / "notebooks" / f"{LESSONS[lesson]}.ipynb"
        if not path.exists():
            print(f"{lesson}: {path.name} does not exist yet, skipped")
            continue
        nb = nbformat.read(path, as_version=4)
        if not apply(nb, lesson):
            print(f"{lesson}: {path.name} is up to date ({len(terms_in(lesson))} terms)")
        elif args.check:
            stale.append(path.name)
            print(f"{lesson}: {path.name} is out of date")
        else:
            nbformat.write(nb, path)
            print(f"{lesson}: {path.name} links {len(terms_in(lesson))} terms")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python tools/link_glossary.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
