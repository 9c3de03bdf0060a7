"""Exercises with instant feedback: write the core of a technique, a checker compares it with the reference.

Every lesson ends with a "## Your turn" section (its source: notebooks/exercises/NN.py, put into the
lesson by tools/add_exercises.py). Each exercise is a stub that raises NotImplementedError and a check:

    from course.exercises import lesson01 as ex

    def causal_mask(T):
        raise NotImplementedError  # your code here

    ex.check_causal_mask(causal_mask)

The check runs your function on random cases (seeded: the same cases every run) against the reference
in the library and prints either a pass or ONE specific hint ("your mask lets token 3 see token 5
(T=6) ..."). It returns True or False and never raises: an unsolved stub prints "not solved yet".
`course.exercises.solution("01.causal_mask")` prints a reference solution.

One module per lesson (lesson00 ... lesson11); `core.py` holds the runner and the helpers. To add a
lesson's exercises: write `lessonNN.py` with checkers decorated by `@exercise("NN", name, solution=...)`
(the solution is the library's function, or a reference written in the module and marked so), add it
to `LESSONS` below, write notebooks/exercises/NN.py, and list two typical wrong answers per exercise
in tests/test_exercises.py (each must produce its hint).
"""
from __future__ import annotations

import importlib

from .core import EXERCISES, Exercise, Hint, exercise, solution

LESSONS = ("00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11")

for _lesson in LESSONS:
    importlib.import_module(f"{__name__}.lesson{_lesson}")

__all__ = ["EXERCISES", "Exercise", "Hint", "LESSONS", "exercise", "solution"]
