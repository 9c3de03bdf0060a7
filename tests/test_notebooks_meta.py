"""What the committed lessons hold for a browser: each code cell executed once, in order; no error
outputs; and for every widget output, its model (and the models it refers to) in the saved widget
state, which is all JupyterLab has to draw it before a kernel runs. `tools/nb.py check` does the
checking; the tests below also show that the checker catches each defect and that `tools/nb.py run`
saves the widget state of its own run."""
import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("nb_tool", ROOT / "tools" / "nb.py")
nb_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nb_tool)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_saved_lesson_is_complete_for_a_browser(path):
    assert nb_tool.check_one(str(path)) == []


def test_lessons_are_found():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


def _widget_view(model_id):
    return nbformat.v4.new_output("display_data", data={
        nb_tool.WIDGET_VIEW: {"model_id": model_id, "version_major": 2, "version_minor": 0},
        "text/plain": "IntSlider(value=0)"})


def _saved(nb, tmp_path, name="x.ipynb"):
    path = tmp_path / name
    nbformat.write(nb, str(path))
    return str(path)


def _executed(*outputs_per_cell):
    cells = [nbformat.v4.new_code_cell("pass", execution_count=i + 1, outputs=list(outs))
             for i, outs in enumerate(outputs_per_cell)]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t")] + cells)


def _state(**models):
    return {nb_tool.WIDGET_STATE: {"version_major": 2, "version_minor": 0, "state": {
        mid: {"model_name": "BoxModel", "model_module": "@jupyter-widgets/controls",
              "model_module_version": "2.0.0", "state": state} for mid, state in models.items()}}}


def test_check_accepts_a_complete_notebook(tmp_path):
    nb = _executed([_widget_view("aa")], [])
    nb.metadata["widgets"] = _state(aa={"children": ["IPY_MODEL_bb"]}, bb={"layout": "IPY_MODEL_cc"}, cc={})
    assert nb_tool.check_one(_saved(nb, tmp_path)) == []


def test_check_finds_a_widget_output_whose_model_was_not_saved(tmp_path):
    nb = _executed([_widget_view("aa")], [_widget_view("dd")])
    nb.metadata["widgets"] = _state(aa={})
    problems = nb_tool.check_one(_saved(nb, tmp_path))
    assert len(problems) == 1 and "cell 2 shows widget dd" in problems[0], problems


def test_check_finds_a_missing_child_model(tmp_path):
    nb = _executed([_widget_view("aa")])
    nb.metadata["widgets"] = _state(aa={"children": ["IPY_MODEL_bb", "IPY_MODEL_ee"]}, bb={})
    problems = nb_tool.check_one(_saved(nb, tmp_path))
    assert len(problems) == 1 and "lacks ee" in problems[0], problems


def test_check_finds_unexecuted_and_out_of_order_cells(tmp_path):
    nb = _executed([], [], [])
    nb.cells[2].execution_count = None
    assert "execution counts [1, None, 3]" in nb_tool.check_one(_saved(nb, tmp_path))[0]
    nb.cells[2].execution_count, nb.cells[3].execution_count = 3, 2
    assert "execution counts [1, 3, 2]" in nb_tool.check_one(_saved(nb, tmp_path))[0]


def test_check_finds_an_error_output(tmp_path):
    err = nbformat.v4.new_output("error", ename="NameError", evalue="name 'x' is not defined", traceback=[])
    problems = nb_tool.check_one(_saved(_executed([], [err]), tmp_path))
    assert len(problems) == 1 and "cell 2 has an error output: NameError" in problems[0], problems


def test_carriage_returns_resolve_like_a_terminal():
    bar = "\rtrain:   0%| | 0/3\rtrain:  67%| | 2/3\rtrain: 100%| | 3/3\n"
    assert nb_tool.resolve_overwrites(bar + "done\n") == "train: 100%| | 3/3\ndone\n"
    assert nb_tool.resolve_overwrites("ab\x08c\n") == "ac\n"


def test_run_saves_the_widget_state_of_its_own_run(tmp_path):
    """One kernel run: the saved state holds the model the output shows, with its last value;
    a stale state from another run is dropped; a text progress bar is saved as its last line."""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import ipywidgets as w\nbox = w.VBox([w.IntSlider(value=3)])\nbox"),
        nbformat.v4.new_code_cell("box.children[0].value = 7"),
        nbformat.v4.new_code_cell("for p in (0, 50, 100):\n    print(f'\\rbar {p:3d}%', end='', flush=True)\nprint()"),
    ])
    nb.metadata["widgets"] = _state(stale={})
    path = _saved(nb, tmp_path)
    nb_tool.run(path)
    saved = nbformat.read(path, as_version=4)
    state, shown = nb_tool.widget_models(saved)
    assert "stale" not in state and len(shown) == 1
    box = shown[0][1]
    assert nb_tool.referenced_models(state, box) <= set(state)
    slider = nb_tool.MODEL_REF.findall(json.dumps(state[box]["state"]["children"]))[0]
    assert state[slider]["state"]["value"] == 7
    assert [c["execution_count"] for c in saved["cells"]] == [1, 2, 3]
    assert saved["cells"][2]["outputs"][0]["text"] == "bar 100%\n"
    assert nb_tool.check_one(path) == []
