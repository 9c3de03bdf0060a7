"""Build a lesson notebook from a percent-format script, and execute it in place.

    python tools/nb.py build lesson.py notebooks/03_x.ipynb   # '# %%' code cells, '# %% [markdown]' text
    python tools/nb.py run notebooks/03_x.ipynb               # execute top to bottom, save outputs
    python tools/nb.py export notebooks/03_x.ipynb lesson.py  # the notebook back as a percent script

Markdown cells are written as comment lines ('# ' stripped). Notebooks are committed executed.
"""
import sys
import time

import nbformat
from nbclient import NotebookClient


def build(src: str, dst: str) -> None:
    cells, kind, lines = [], None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif body:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in open(src).read().splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, dst)


def export(src: str, dst: str) -> None:
    """Inverse of build: code cells as '# %%' blocks, markdown cells as '# %% [markdown]' comment blocks."""
    nb = nbformat.read(src, as_version=4)
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            body = "\n".join(("# " + l) if l else "#" for l in cell.source.splitlines())
            parts.append("# %% [markdown]\n" + body)
        elif cell.cell_type == "code":
            parts.append("# %%\n" + cell.source)
    open(dst, "w").write("\n\n".join(parts) + "\n")


def run(path: str, timeout: int = 1200) -> None:
    """Execute cell by cell (printing each code cell's seconds), then save with outputs."""
    nb = nbformat.read(path, as_version=4)
    start = time.time()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": "notebooks"}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                t = time.time()
                client.execute_cell(cell, i)
                print(f"  cell {i:3d}: {time.time() - t:6.1f} s", flush=True)
    nbformat.write(nb, path)
    print(f"{path}: executed in {time.time() - start:.0f} s")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"build": build, "run": run, "export": export}[cmd](*args)
