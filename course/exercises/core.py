"""The exercise runner: run a learner's function against the reference, print one specific hint.

An exercise is a checker function decorated with `@exercise(lesson, name, solution=...)`:

    @exercise("01", "causal_mask", solution=causal_mask)
    def check_causal_mask(fn, rng, gen):
        for T in sizes(rng):
            got = call(fn, T)                       # the learner's code, exceptions become hints
            expect_tensor(got, "causal_mask(T)", shape=(T, T), dtype=torch.bool)
            first_mask_difference(got, causal_mask(T), extra=..., missing=...)  # raises Hint
        return f"{n} sizes"                         # what was checked, for the pass message

The decorator returns the learner-facing function `check_causal_mask(fn, seed=0) -> bool`. It
NEVER raises for a wrong answer: an unsolved stub (NotImplementedError), a wrong result (`Hint`) and
any exception from the learner's code are all turned into one printed line and `False`; a pass
prints what was checked and returns `True`. Lesson notebooks ship with the stubs unsolved, so the
check cell prints "not solved yet" and nbval sees no error output.

`rng` (random.Random) and `gen` (torch.Generator) are seeded from `seed`, so every run draws the
same cases. Every registered exercise is in `EXERCISES` (id "01.causal_mask" -> Exercise), and
tests/test_exercises.py runs each checker on its solution and on typical wrong answers.
"""
from __future__ import annotations

import functools
import inspect
import random
from dataclasses import dataclass
from typing import Callable

import torch

PASS, FAIL, TODO = "✓", "✗", "…"


class Hint(Exception):
    """A wrong answer, with the sentence that tells the learner what is wrong."""


class Unsolved(Exception):
    """The learner's function still raises NotImplementedError."""


@dataclass
class Exercise:
    id: str  # "01.causal_mask"
    lesson: str  # "01"
    name: str
    checker: Callable  # checker(fn, rng, gen) -> str | None; raises Hint / Unsolved
    solution: Callable  # a correct answer with the learner's signature
    check: Callable = None  # the public, never-raising check function

    def run(self, fn, seed: int = 0) -> tuple[bool, str]:
        """(passed, message). Never raises for anything the learner's code does."""
        rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: extra threads only wait for each other (10x slower under load)
        try:
            what = self.checker(fn, rng, gen)
        except Unsolved:
            return False, (f"{TODO} {self.id}: not solved yet. Replace `raise NotImplementedError` with your "
                           f"code and run this cell again.")
        except Hint as h:
            return False, f"{FAIL} {self.id}: {h}"
        except Exception as e:  # a result the checker could not even compare: say so, do not raise
            return False, f"{FAIL} {self.id}: your answer could not be checked ({type(e).__name__}: {e})."
        finally:
            torch.set_num_threads(threads)
        return True, f"{PASS} {self.id}: correct{f' on {what}' if what else ''} (seed {seed})."


EXERCISES: dict[str, Exercise] = {}


def exercise(lesson: str, name: str, solution: Callable):
    """Register a checker; return the learner-facing `check(fn, seed=0) -> bool`."""
    def wrap(checker):
        ex = Exercise(f"{lesson}.{name}", lesson, name, checker, solution)
        if ex.id in EXERCISES:
            raise ValueError(f"exercise {ex.id} is registered twice")

        @functools.wraps(checker)
        def check(fn, seed: int = 0) -> bool:
            passed, message = ex.run(fn, seed)
            print(message)
            return passed
        check.__doc__ = (checker.__doc__ or "") + "\n\nPrints a hint or a pass; returns True/False; never raises."
        ex.check = check
        EXERCISES[ex.id] = ex
        return check
    return wrap


def solution(exercise_id: str) -> str:
    """The source of a reference solution (for after you have tried)."""
    if exercise_id not in EXERCISES:
        raise ValueError(f"exercise_id must be one of {sorted(EXERCISES)}, got {exercise_id!r}")
    sol = EXERCISES[exercise_id].solution
    parts = sol if isinstance(sol, tuple) else (sol,)
    try:
        return "\n\n".join(inspect.getsource(f) for f in parts)
    except (OSError, TypeError):
        return repr(sol)


# ----------------------------------------------------------------------------- helpers for checkers

def call(fn, *args, describe: str | None = None, errors: dict | None = None, **kwargs):
    """Run the learner's fn. NotImplementedError -> Unsolved; any other exception -> a Hint naming the
    call, or errors[type] (a string, or a function of the exception) for a mistake the checker can explain."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise Unsolved() from None
    except Exception as e:
        for kind, hint in (errors or {}).items():
            if isinstance(e, kind):
                raise Hint(hint(e) if callable(hint) else hint) from None
        shown = describe or f"{getattr(fn, '__name__', 'your function')}({_args(args, kwargs)})"
        raise Hint(f"{shown} raised {type(e).__name__}: {e}") from None


def _args(args, kwargs) -> str:
    show = lambda v: f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v) if len(repr(v)) < 40 else "..."
    return ", ".join([show(a) for a in args] + [f"{k}={show(v)}" for k, v in kwargs.items()])


def expect_tensor(got, what: str, shape=None, dtype=None) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise Hint(f"{what} should return a torch.Tensor, got {type(got).__name__}")
    if shape is not None and tuple(got.shape) != tuple(shape):
        raise Hint(f"{what} should have shape {tuple(shape)}, got {tuple(got.shape)}")
    if dtype is not None and got.dtype != dtype:
        raise Hint(f"{what} should have dtype {dtype}, got {got.dtype}")
    return got


def first_mask_difference(got: torch.Tensor, want: torch.Tensor, extra: Callable, missing: Callable) -> None:
    """Raise Hint(extra(i, j)) at the first (row-major) entry True in got but not in want, or
    Hint(missing(i, j)) at the first entry False in got but True in want. Indices are ints."""
    got = got.bool()
    for cond, say in ((got & ~want, extra), (~got & want, missing)):
        where = cond.nonzero()
        if len(where):
            raise Hint(say(*(int(v) for v in where[0])))


def close(a, b, rtol: float, atol: float = 0.0) -> bool:
    """Same shape and allclose (NaN never equal): for float64 comparisons with a stated tolerance."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol))
    return abs(a - b) <= atol + rtol * abs(b)


def match_mistake(got, mistakes: dict[str, object], rtol: float = 1e-9, atol: float = 0.0) -> str | None:
    """The hint of the first known wrong answer that `got` equals (mistakes: hint -> that wrong value)."""
    for hint, wrong in mistakes.items():
        try:
            if close(got, wrong, rtol, atol):
                return hint
        except (RuntimeError, TypeError, ValueError):
            continue
    return None
