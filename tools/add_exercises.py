"""Put each lesson's "## Your turn" section (exercises with checks) into its notebook, idempotently.

    python tools/add_exercises.py            # every lesson with a snippet and a notebook
    python tools/add_exercises.py 01 04      # only these lessons
    python tools/add_exercises.py --check    # change nothing; exit 1 if a notebook is out of date

The section's source is notebooks/exercises/NN.py (percent format, read exactly as tools/nb.py reads a
lesson script). In notebooks/NN_*.ipynb the section is the markdown cell that starts with "## Your turn"
and every cell after it up to the next "#" or "##" heading cell (or the end). It is replaced by the
snippet's cells, or appended at the end when the lesson has none. Every other cell is left untouched.
If the section already holds exactly the snippet's cells, the notebook is not rewritten, so executed
outputs survive a second run. New code cells have no outputs: execute the lesson afterwards
(`python tools/nb.py run notebooks/NN_x.ipynb`); each check then prints "not solved yet".
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = ROOT / "notebooks" / "exercises"
HEADING = "## Your turn"


def _nb_tool():
    spec = importlib.util.spec_from_file_location("_course_nb_tool", ROOT / "tools" / "nb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snippet_cells(lesson: str) -> list:
    """The cells of notebooks/exercises/NN.py, with stable ids (your-turn-NN-k)."""
    src = SNIPPETS / f"{lesson}.py"
    fd, tmp = tempfile.mkstemp(suffix=".ipynb")
    os.close(fd)
    try:
        _nb_tool().build(str(src), tmp)
        cells = nbformat.read(tmp, as_version=4).cells
    finally:
        os.unlink(tmp)
    if not cells or cells[0].cell_type != "markdown" or not cells[0].source.startswith(HEADING):
        raise ValueError(f"{src}: the first cell must be a markdown cell starting with {HEADING!r}")
    for k, cell in enumerate(cells):
        cell.id = f"your-turn-{lesson}-{k}"
    return cells


def _is_heading(cell) -> bool:
    return cell.cell_type == "markdown" and re.match(r"#{1,2} ", cell.source.lstrip()) is not None


def find_section(cells) -> tuple[int, int] | None:
    """(start, stop) of the "## Your turn" section, or None."""
    start = next((i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.lstrip().startswith(HEADING)),
                 None)
    if start is None:
        return None
    stop = next((i for i in range(start + 1, len(cells)) if _is_heading(cells[i])), len(cells))
    return start, stop


def _same(old, new) -> bool:
    return len(old) == len(new) and all(a.cell_type == b.cell_type and a.source == b.source for a, b in zip(old, new))


def apply(nb, lesson: str) -> bool:
    """Put the lesson's section into nb (in place). True if nb changed."""
    new = snippet_cells(lesson)
    where = find_section(nb.cells)
    if where is None:
        nb.cells.extend(new)
        return True
    start, stop = where
    if _same(nb.cells[start:stop], new):
        return False
    nb.cells[start:stop] = new
    return True


def notebook_for(lesson: str) -> Path | None:
    found = sorted((ROOT / "notebooks").glob(f"{lesson}_*.ipynb"))
    return found[0] if found else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lessons", nargs="*", help="lesson ids, e.g. 01 04 (default: every snippet)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is out of date")
    args = parser.parse_args(argv)
    lessons = args.lessons or sorted(p.stem for p in SNIPPETS.glob("[0-9][0-9].py"))
    stale = []
    for lesson in lessons:
        if not (SNIPPETS / f"{lesson}.py").exists():
            raise SystemExit(f"no snippet notebooks/exercises/{lesson}.py for lesson {lesson!r}")
        path = notebook_for(lesson)
        if path is None:
            print(f"{lesson}: no notebooks/{lesson}_*.ipynb yet, skipped")
            continue
        nb = nbformat.read(path, as_version=4)
        if not apply(nb, lesson):
            print(f"{lesson}: {path.name} is up to date")
        elif args.check:
            stale.append(path.name)
            print(f"{lesson}: {path.name} is out of date")
        else:
            nbformat.write(nb, path)
            print(f"{lesson}: {path.name} updated; execute it: python tools/nb.py run {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python tools/add_exercises.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
