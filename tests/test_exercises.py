"""Every exercise checker: passes its reference solution, gives the specific hint to typical wrong
answers, and never raises (an unsolved stub, a crash or a wrong type all print one line and return False).
The lesson snippets (notebooks/exercises/NN.py) call registered checks and ship unsolved."""
import pytest

from course.exercises import EXERCISES, LESSONS, solution
from exercise_answers import WRONG

IDS = sorted(EXERCISES)


def test_every_lesson_has_two_to_four_exercises():
    per_lesson = {}
    for ex in EXERCISES.values():
        per_lesson.setdefault(ex.lesson, []).append(ex.name)
    for lesson, names in per_lesson.items():
        assert 2 <= len(names) <= 4, (lesson, names)
    assert set(per_lesson) == set(LESSONS)


@pytest.mark.parametrize("exercise_id", IDS)
def test_the_reference_solution_passes(exercise_id, capsys):
    ex = EXERCISES[exercise_id]
    assert ex.check(ex.solution) is True
    out = capsys.readouterr().out
    assert out.startswith(f"✓ {exercise_id}: correct"), out


@pytest.mark.parametrize("exercise_id", IDS)
def test_every_exercise_has_two_typical_wrong_answers(exercise_id):
    assert len(WRONG.get(exercise_id, [])) >= 2, f"tests/exercise_answers.py: add wrong answers for {exercise_id}"


CASES = [(eid, i) for eid in sorted(WRONG) for i in range(len(WRONG[eid]))]


@pytest.mark.parametrize("exercise_id,i", CASES, ids=[f"{e}-{i}" for e, i in CASES])
def test_a_typical_wrong_answer_gets_its_specific_hint(exercise_id, i, capsys):
    fn, hint = WRONG[exercise_id][i]
    assert EXERCISES[exercise_id].check(fn) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ {exercise_id}: "), out
    assert hint in out, f"expected the hint {hint!r}, got: {out}"


def _stub(*args, **kwargs):
    raise NotImplementedError


def _crash(*args, **kwargs):
    raise ValueError("boom")


def _as_answer(exercise_id, fn):
    """Exercises whose solution is a pair of functions (09.resume) take a pair."""
    return (fn, fn) if isinstance(EXERCISES[exercise_id].solution, tuple) else fn


@pytest.mark.parametrize("exercise_id", IDS)
def test_an_unsolved_stub_is_reported_not_raised(exercise_id, capsys):
    assert EXERCISES[exercise_id].check(_as_answer(exercise_id, _stub)) is False
    assert "not solved yet" in capsys.readouterr().out


@pytest.mark.parametrize("exercise_id", IDS)
@pytest.mark.parametrize("answer", [_crash, lambda *a, **k: None, lambda *a, **k: "text"], ids=["raises", "none", "str"])
def test_crashes_and_wrong_types_are_reported_not_raised(exercise_id, answer, capsys):
    assert EXERCISES[exercise_id].check(_as_answer(exercise_id, answer)) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ {exercise_id}: ") and len(out.splitlines()) == 1, out
    if answer is _crash:
        assert "ValueError: boom" in out


def test_the_same_seed_draws_the_same_cases():
    ex = EXERCISES["01.causal_mask"]
    seen = []

    def spy(T):
        seen.append(T)
        return ex.solution(T)
    ex.run(spy, seed=3)
    first, seen[:] = list(seen), []
    ex.run(spy, seed=3)
    assert seen == first
    seen[:] = []
    ex.run(spy, seed=4)
    assert seen != first


@pytest.mark.parametrize("exercise_id", IDS)
def test_a_solution_can_be_shown(exercise_id):
    src = solution(exercise_id)
    assert "def " in src or "return" in src or "<function" in src


def test_unknown_exercise_id_is_a_clear_error():
    with pytest.raises(ValueError, match="exercise_id must be one of"):
        solution("99.nothing")


# ----------------------------------------------------------------------------- lesson snippets and the tool

import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import nbformat  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import add_exercises  # noqa: E402


@pytest.mark.parametrize("lesson", LESSONS)
def test_each_snippet_checks_exactly_its_lessons_exercises(lesson):
    cells = add_exercises.snippet_cells(lesson)
    called = set(re.findall(r"\bex\.(check_\w+)\(", "\n".join(c.source for c in cells if c.cell_type == "code")))
    module = importlib.import_module(f"course.exercises.lesson{lesson}")
    registered = {ex.check.__name__ for ex in EXERCISES.values() if ex.lesson == lesson}
    assert called == registered, (called, registered)
    assert all(getattr(module, name) is not None for name in called)
    assert f"lesson{lesson} as ex" in cells[1].source


@pytest.mark.parametrize("lesson", LESSONS)
def test_each_snippet_ships_unsolved_and_runs_without_error(lesson):
    code = [c.source for c in add_exercises.snippet_cells(lesson) if c.cell_type == "code"]
    for src in code:
        logic = [line for line in src.splitlines() if line.strip() and not line.strip().startswith(("#", '"""'))]
        assert len(logic) <= 15, src  # notebook cells <= ~15 lines of logic
        assert "raise NotImplementedError" in src and "# NBVAL_CHECK_OUTPUT" in src
    namespace, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        for src in code:
            exec(compile(src, f"notebooks/exercises/{lesson}.py", "exec"), namespace)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(code) and all("not solved yet" in line for line in lines), lines
    assert namespace["ok"] is False


def _nb(*sources):
    cells = [nbformat.v4.new_markdown_cell(s[3:]) if s.startswith("md:") else nbformat.v4.new_code_cell(s)
             for s in sources]
    return nbformat.v4.new_notebook(cells=cells)


def test_the_tool_appends_the_section_when_a_lesson_has_none():
    nb = _nb("md:# 01 · title", "x = 1", "md:## What to remember")
    before = [c.source for c in nb.cells]
    assert add_exercises.apply(nb, "01") is True
    new = add_exercises.snippet_cells("01")
    assert [c.source for c in nb.cells] == before + [c.source for c in new]
    assert add_exercises.apply(nb, "01") is False  # idempotent


def test_the_tool_replaces_an_existing_section_and_nothing_else():
    nb = _nb("md:# 04 · title", "x = 1", "md:## Your turn\n\n- ideas", "y = 2", "md:## Summary", "z = 3")
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="kept\n")]
    assert add_exercises.apply(nb, "04") is True
    new = [c.source for c in add_exercises.snippet_cells("04")]
    assert [c.source for c in nb.cells] == ["# 04 · title", "x = 1", *new, "## Summary", "z = 3"]
    assert nb.cells[1].outputs[0]["text"] == "kept\n"
    executed = nb.cells[3]  # the first exercise code cell, as if the lesson had been executed
    executed.outputs = [nbformat.v4.new_output("stream", text="… not solved yet\n")]
    assert add_exercises.apply(nb, "04") is False and nb.cells[3].outputs  # outputs survive a second run
    nbformat.validate(nb)


@pytest.mark.parametrize("lesson", LESSONS)
def test_committed_lessons_carry_their_exercises(lesson):
    path = add_exercises.notebook_for(lesson)
    if path is None:
        pytest.skip(f"lesson {lesson} has no notebook in notebooks/ yet")
    nb = nbformat.read(path, as_version=4)
    where = add_exercises.find_section(nb.cells)
    assert where is not None and not add_exercises.apply(nb, lesson), (
        f"{path.name}: the '## Your turn' section differs from notebooks/exercises/{lesson}.py; run "
        f"python tools/add_exercises.py {lesson} and re-execute the lesson")


from exercise_answers import RIGHT  # noqa: E402

RIGHT_CASES = [(eid, i) for eid in sorted(RIGHT) for i in range(len(RIGHT[eid]))]


@pytest.mark.parametrize("exercise_id,i", RIGHT_CASES, ids=[f"{e}-{i}" for e, i in RIGHT_CASES])
def test_a_correct_answer_written_differently_passes(exercise_id, i, capsys):
    fn = RIGHT[exercise_id][i]
    answer = fn() if isinstance(EXERCISES[exercise_id].solution, tuple) else fn
    assert EXERCISES[exercise_id].check(answer) is True, capsys.readouterr().out


def test_the_pipeline_simulator_measures_gpipe_and_1f1b_and_detects_deadlocks():
    from course.exercises.lesson07 import _one_f_one_b, gpipe, simulate
    for p, m in [(2, 1), (4, 8), (3, 5)]:
        for tf, tb in [(1.0, 2.0), (1.0, 1.0)]:
            gp = simulate([gpipe(p, m, s) for s in range(p)], tf, tb)
            assert gp == (m + p - 1) * (tf + tb)  # GPipe: fill and drain, Huang et al. 2019
            assert simulate([_one_f_one_b(p, m, s) for s in range(p)], tf, tb) == gp  # same bubble, less memory
    with pytest.raises(ValueError, match="deadlocks"):
        simulate([[("B", 0), ("F", 0)], [("F", 0), ("B", 0)]])


@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_lesson07_simulator_agrees_with_the_library_simulator(p, m):
    """The checker's small simulator and course.parallel.schedules.simulate give the same makespan."""
    from course.exercises import lesson07
    from course.parallel import schedules
    ours = lesson07.simulate([lesson07._one_f_one_b(p, m, s) for s in range(p)], tf=1.0, tb=2.0)
    lib = schedules.simulate(schedules.one_f_one_b(p, m), cost={"F": 1.0, "B": 2.0}).makespan
    assert ours == lib
