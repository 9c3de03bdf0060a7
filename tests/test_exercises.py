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
