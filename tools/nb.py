"""Build a lesson notebook from a percent-format script, execute it in place, check what was saved.

    python tools/nb.py build lesson.py notebooks/03_x.ipynb   # '# %%' code cells, '# %% [markdown]' text
    python tools/nb.py run notebooks/03_x.ipynb [...]         # execute top to bottom, save outputs
    python tools/nb.py check [notebooks/*.ipynb]              # what a browser needs from the saved file
    python tools/nb.py export notebooks/03_x.ipynb lesson.py  # the notebook back as a percent script

Markdown cells are written as comment lines ('# ' stripped). Notebooks are committed executed.

`run` executes every cell in ONE kernel and saves, with the outputs, the ipywidgets state of that
same run in the notebook metadata ("widgets"): JupyterLab draws a widget output from a kernel-less
notebook only from that state, and an output whose model id the state lacks shows "Error
displaying widget: model not found". Consecutive stream outputs are merged and their carriage
returns resolved, so a text progress bar is saved as its last line (JupyterLab shows the same).

`check` verifies, for each notebook, that every code cell ran once, in order (counts 1, 2, 3 ...),
that no output is an error, and that every widget model an output refers to (directly or as a
child, "IPY_MODEL_<id>") is in the saved widget state. It exits non-zero listing each problem.
"""
import glob
import json
import os
import re
import sys
import time

import nbformat
from nbclient import NotebookClient

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MODEL_REF = re.compile(r"IPY_MODEL_([0-9a-f]+)")


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


def resolve_overwrites(text: str) -> str:
    """What a terminal shows: a backspace erases a character, a carriage return restarts the line.
    The same rules nbval applies before comparing outputs, so a saved output compares as before."""
    erased = re.sub(r"[^\n]\x08", "", text)
    while erased != text:
        text, erased = erased, re.sub(r"[^\n]\x08", "", erased)
    return re.sub(r"^.*\r(?=[^\n])", "", text, flags=re.M)


def tidy_streams(outputs: list) -> list:
    """Merge consecutive outputs of the same stream (order against figures kept), resolve '\\r'."""
    tidy = []
    for out in outputs:
        if out.output_type == "stream" and tidy and tidy[-1].output_type == "stream" and tidy[-1].name == out.name:
            tidy[-1].text += out.text
        else:
            tidy.append(out)
    for out in tidy:
        if out.output_type == "stream":
            out.text = resolve_overwrites(out.text)
    return tidy


def run_one(path: str, timeout: int = 1200) -> None:
    """Execute cell by cell in one kernel (printing each code cell's seconds), save outputs + widget state."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)  # never keep the state of an earlier run
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as make sets it (README, 'A busy machine')
    start = time.time()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
    with client.setup_kernel():
        count = 0
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                t = time.time()
                count += 1
                client.execute_cell(cell, i, execution_count=count)
                cell.outputs = tidy_streams(cell.outputs)
                print(f"  cell {i:3d}: {time.time() - t:6.1f} s", flush=True)
        client.set_widgets_metadata()  # the state of every widget this kernel created, as last updated
    nbformat.write(nb, path)
    problems = check_one(path)
    for p in problems:
        print("  " + p)
    print(f"{path}: executed in {time.time() - start:.0f} s")
    if problems:
        raise SystemExit(f"{path}: {len(problems)} problem(s) in the saved notebook")


def run(*paths: str) -> None:
    if not paths:
        raise SystemExit("usage: python tools/nb.py run notebooks/NN_x.ipynb [...]")
    for path in paths:
        run_one(path)


def widget_models(nb: dict) -> tuple[dict, list[tuple[int, str]]]:
    """(saved widget state by model id, [(cell index, model id) for each widget output])."""
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    shown = []
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view:
                shown.append((i, view["model_id"]))
    return state, shown


def referenced_models(state: dict, model_id: str) -> set[str]:
    """model_id and every model it refers to, transitively (children, layout, style, ...)."""
    seen, todo = set(), [model_id]
    while todo:
        mid = todo.pop()
        if mid in seen:
            continue
        seen.add(mid)
        if mid in state:
            todo += MODEL_REF.findall(json.dumps(state[mid].get("state", {})))
    return seen


def check_one(path: str) -> list[str]:
    """Problems a learner would see when opening the saved notebook; [] when there are none."""
    nb = json.loads(open(path).read())
    name = os.path.basename(path)
    problems = []
    code = [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for _, c in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"{name}: code cells not executed once each, in order: execution counts {counts}")
    for i, cell in code:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"{name}: cell {i} has an error output: {out.get('ename')}: {out.get('evalue')}")
    state, shown = widget_models(nb)
    for i, mid in shown:
        missing = sorted(referenced_models(state, mid) - set(state))
        if missing:
            problems.append(f"{name}: cell {i} shows widget {mid} but the saved widget state lacks "
                            f"{', '.join(missing)} ({len(state)} models saved): re-run with tools/nb.py run")
    return problems


def check(*paths: str) -> None:
    paths = paths or tuple(sorted(glob.glob("notebooks/*.ipynb")))
    problems = [p for path in paths for p in check_one(path)]
    for p in problems:
        print(p)
    print(f"checked {len(paths)} notebook(s): {len(problems)} problem(s)")
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:] or ["help"]
    if cmd not in ("build", "run", "check", "export"):
        raise SystemExit(__doc__)
    {"build": build, "run": run, "check": check, "export": export}[cmd](*args)
