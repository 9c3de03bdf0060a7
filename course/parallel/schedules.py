"""Pipeline schedules as data: for each rank, the ordered list of what it does.

A model of S = p·v stages runs on p ranks; rank r holds stages r, r + p, ..., r + (v-1)p (v
"virtual stages" per rank, Narayanan et al. 2021, "Efficient large-scale language model training
on GPU clusters using Megatron-LM", section 2.2.2). A batch is cut into m micro-batches. An action
is (stage, kind, micro-batch), written as PyTorch's pipelining writes it ("1F3": stage 1, forward,
micro-batch 3):

    F       forward                          B       full backward (input and weight gradients)
    I       backward, input gradient only    W       backward, weight gradient only (I + W = B)
    SEND_F  send the forward output on       RECV_F  receive the forward input
    SEND_B  send the input gradient back     RECV_B  receive the output gradient

The generators below write the classic schedules; `with_comms` adds the sends and receives (a
receive just before the action that needs the data, a send just after the one that made it);
`validate` checks any schedule, hand-written ones included, and names the first broken rule and
action; `simulate` plays it with per-action costs and a link cost into a `Timeline` (bubble, peak
live activations). `course.parallel.pipeline` executes the same lists on real ranks.

Sends are asynchronous (posted, the sender carries on) and receives block until the data is
there, as in Megatron-LM's and PyTorch's runtimes; a schedule deadlocks when every unfinished rank
waits for a message no rank will send.

- GPipe (Huang et al. 2019, "GPipe", section 2.2): all forwards, then all backwards.
  Idle share of the pipeline (p-1)/(m+p-1); peak live micro-batches per stage m.
- 1F1B (PipeDream-Flush; Narayanan et al. 2021, section 2.2.1): after p-1-r warm-up forwards, rank
  r alternates one forward and one backward. The same bubble as GPipe, (p-1)/m of the ideal
  time, but at most p - r micro-batches live on rank r.
- Interleaved 1F1B (the same paper, section 2.2.2): v chunks per rank, bubble (p-1)/(v·m) of the
  ideal time, needs m to be a multiple of p; rank 0 holds up to v·p + p - 1 chunks, i.e.
  p + (p-1)/v micro-batches' worth (Korthikanti et al. 2022, section 4.2.3: a factor 1 + (p-1)/(pv)).
- ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 2.1): 1F1B with B split into
  I and W; the W passes, which nothing waits for, fill the bubbles. Idle time per rank
  (p-1)(T_F + T_I - T_W) instead of 1F1B's (p-1)(T_F + T_I + T_W); at most p micro-batches live.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

COMPUTE = ("F", "B", "I", "W")
COMMS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
KINDS = COMPUTE + COMMS
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
DEFAULT_COST = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}  # backward = 2x forward; I and W halves (Qi et al.)


@dataclass(frozen=True)
class Action:
    stage: int
    kind: str
    mb: int

    def __str__(self):
        return f"{self.stage}{self.kind}{self.mb}"

    @staticmethod
    def parse(text: str) -> "Action":
        match = re.fullmatch(r"(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)", text.strip())
        if not match:
            raise ValueError(f"cannot read action {text!r}: write [stage][kind][micro-batch], e.g. '1F3', '0SEND_F2'")
        return Action(int(match[1]), match[2], int(match[3]))


@dataclass
class Schedule:
    name: str
    p: int  # ranks
    m: int  # micro-batches
    v: int  # virtual stages (model chunks) per rank
    ranks: list[list[Action]]  # ranks[r] = what rank r does, in order

    @property
    def n_stages(self) -> int:
        return self.p * self.v

    def rank_of(self, stage: int) -> int:
        return stage % self.p

    def compute(self, rank: int) -> list[Action]:
        return [a for a in self.ranks[rank] if a.kind in COMPUTE]

    def to_csv(self, compute_only: bool = True) -> str:
        """One line per rank, PyTorch's pipelining CSV format (`_PipelineScheduleRuntime._load_csv`)."""
        return "\n".join(",".join(str(a) for a in (self.compute(r) if compute_only else self.ranks[r]))
                         for r in range(self.p)) + "\n"

    def __str__(self):
        return f"{self.name} (p={self.p}, m={self.m}, v={self.v})\n" + "\n".join(
            f"  rank {r}: " + " ".join(str(a) for a in self.compute(r)) for r in range(self.p))


def _check(p: int, m: int, v: int) -> None:
    for name, value, low in (("p", p, 2), ("m", m, 1), ("v", v, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            hint = " (a pipeline needs at least 2 stages on 2 ranks)" if name == "p" else ""
            raise ValueError(f"{name} must be an integer >= {low}{hint}, got {value!r}")


def from_compute(name: str, p: int, m: int, v: int, compute: list[list[Action]]) -> Schedule:
    """A schedule from compute actions only; the sends and receives are added by `with_comms`."""
    _check(p, m, v)
    if len(compute) != p:
        raise ValueError(f"a schedule for p={p} ranks needs {p} action lists, got {len(compute)}")
    return Schedule(name, p, m, v, with_comms(compute, p * v))


def with_comms(compute: list[list[Action]], n_stages: int) -> list[list[Action]]:
    """Receive just before the action that needs the data, send just after the one that made it."""
    out = []
    for actions in compute:
        ranked = []
        for a in actions:
            if a.kind == "F" and a.stage > 0:
                ranked.append(Action(a.stage, "RECV_F", a.mb))
            if a.kind in ("B", "I") and a.stage < n_stages - 1:
                ranked.append(Action(a.stage, "RECV_B", a.mb))
            ranked.append(a)
            if a.kind == "F" and a.stage < n_stages - 1:
                ranked.append(Action(a.stage, "SEND_F", a.mb))
            if a.kind in ("B", "I") and a.stage > 0:
                ranked.append(Action(a.stage, "SEND_B", a.mb))
        out.append(ranked)
    return out


# ----------------------------------------------------------------------------- generators


def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019)."""
    _check(p, m, 1)
    return from_compute("gpipe", p, m, 1, [[Action(r, "F", i) for i in range(m)] + [Action(r, "B", i) for i in range(m)]
                                           for r in range(p)])


def one_f_one_b(p: int, m: int) -> Schedule:
    """PipeDream-Flush 1F1B (Narayanan et al. 2021, section 2.2.1), in picotron's three phases."""
    _check(p, m, 1)
    ranks = []
    for r in range(p):
        warmup = min(p - 1 - r, m)  # forwards in flight before the first backward comes back
        steady = m - warmup
        acts = [Action(r, "F", i) for i in range(warmup)]  # warm-up
        for i in range(steady):  # steady state: one forward, one backward
            acts += [Action(r, "F", warmup + i), Action(r, "B", i)]
        acts += [Action(r, "B", i) for i in range(steady, m)]  # cool-down: drain the backwards
        ranks.append(acts)
    return from_compute("1f1b", p, m, 1, ranks)


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """1F1B over v model chunks per rank (Narayanan et al. 2021, section 2.2.2; Megatron-LM's order).

    Forward number k of a rank runs chunk (k // p) % v on micro-batch (k // (p·v))·p + k % p: p
    micro-batches go through one chunk, then the same p through the next chunk, and so on; backward
    number k walks the chunks in reverse. Warm-up: (v-1)·p + 2·(p-1-r) forwards on rank r."""
    _check(p, m, v)
    if v < 2:
        raise ValueError(f"interleaved 1F1B needs v >= 2 chunks per rank, got v={v} (v=1 is plain 1F1B: '1f1b')")
    if m % p:
        raise ValueError(f"interleaved 1F1B needs m to be a multiple of p (Narayanan et al. 2021, section 2.2.2): "
                         f"m={m}, p={p}; use m in {[p * k for k in range(1, 4)]}...")
    total = v * m

    def mb(k):
        return (k // (p * v)) * p + k % p

    ranks = []
    for r in range(p):
        fwd = [Action(((k // p) % v) * p + r, "F", mb(k)) for k in range(total)]
        bwd = [Action((v - 1 - (k // p) % v) * p + r, "B", mb(k)) for k in range(total)]
        warmup = min((v - 1) * p + 2 * (p - 1 - r), total)
        acts = fwd[:warmup]  # warm-up
        for k in range(total - warmup):  # steady state
            acts += [fwd[warmup + k], bwd[k]]
        acts += bwd[total - warmup:]  # cool-down
        ranks.append(acts)
    return from_compute("interleaved", p, m, v, ranks)


def zb_h1(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, section 2.1): 1F1B's forwards and input-gradient passes I, with rank r
    running its weight passes W r micro-batches late, so that they fill the cool-down bubble while
    the I passes, which the previous stage waits for, go first. PyTorch's ZB1P order for v = 1."""
    _check(p, m, 1)
    ranks = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        acts = [Action(r, "F", i) for i in range(warmup)]  # warm-up, as 1F1B
        w = 0
        for i in range(m):  # steady state (F, I, W late by r) then cool-down (I, W)
            if warmup + i < m:
                acts.append(Action(r, "F", warmup + i))
            acts.append(Action(r, "I", i))
            if i >= r:
                acts.append(Action(r, "W", w))
                w += 1
        acts += [Action(r, "W", j) for j in range(w, m)]  # the weight passes still owed
        ranks.append(acts)
    return from_compute("zb-h1", p, m, 1, ranks)


def forward_only(p: int, m: int, v: int = 1) -> Schedule:
    """Every forward in stage order (evaluation: no backward, nothing kept)."""
    _check(p, m, v)
    return from_compute("forward", p, m, v, [[Action(c * p + r, "F", i) for c in range(v) for i in range(m)]
                                             for r in range(p)])


def make(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """One of SCHEDULES by name; v is used by 'interleaved' only."""
    if name == "interleaved":
        return interleaved_1f1b(p, m, v)
    makers = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zb_h1}
    if name not in makers:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if v != 1:
        raise ValueError(f"schedule {name!r} runs one stage per rank (v=1), got v={v}; use 'interleaved' for v > 1")
    return makers[name](p, m)


# ----------------------------------------------------------------------------- validator and simulator


@dataclass
class Timeline:
    """What each rank did and when: events[r] = [(action, start, end), ...] (compute actions only)."""
    p: int
    events: list[list[tuple[Action, float, float]]]
    peak_live: list[int] = field(default_factory=list)  # per rank, in (micro-batch, stage) chunks

    @property
    def makespan(self) -> float:
        return max(e for ev in self.events for _, _, e in ev) - min(s for ev in self.events for _, s, _ in ev)

    @property
    def busy(self) -> list[float]:
        return [sum(e - s for _, s, e in ev) for ev in self.events]

    @property
    def bubble(self) -> float:
        """Idle share of all ranks' time, 1 - busy / (p · makespan): GPipe's (p-1)/(m+p-1)."""
        return 1.0 - sum(self.busy) / (self.p * self.makespan)

    @property
    def bubble_ratio(self) -> float:
        """Idle time over ideal time, makespan / busy - 1: Megatron's (p-1)/m and (p-1)/(v·m)."""
        busy = sum(self.busy) / self.p
        return self.makespan / busy - 1.0


def _fail(rule: str, rank: int, action, detail: str):
    raise ValueError(f"invalid schedule, rule '{rule}': rank {rank}, action {action}: {detail}")


def validate(schedule: Schedule) -> list[int]:
    """ValueError naming the first broken rule and action; else the peak live chunks per rank."""
    p, m, S = schedule.p, schedule.m, schedule.n_stages
    _check(p, m, schedule.v)
    if len(schedule.ranks) != p:
        raise ValueError(f"invalid schedule: {len(schedule.ranks)} action lists for p={p} ranks")
    seen: dict[tuple, tuple[int, int]] = {}  # (kind, stage, mb) -> (rank, position)
    for r, actions in enumerate(schedule.ranks):
        for i, a in enumerate(actions):
            if not isinstance(a, Action) or a.kind not in KINDS:
                _fail("well-formed", r, a, f"not an Action with a kind in {KINDS}")
            if not (0 <= a.stage < S and 0 <= a.mb < m):
                _fail("well-formed", r, a, f"stage must be in [0, {S}) and micro-batch in [0, {m})")
            if schedule.rank_of(a.stage) != r:
                _fail("stage placement", r, a, f"stage {a.stage} lives on rank {schedule.rank_of(a.stage)} (stage % p)")
            if (a.kind, a.stage, a.mb) in seen:
                _fail("each action once", r, a, f"already at position {seen[(a.kind, a.stage, a.mb)][1]}")
            if (a.kind == "SEND_F" and a.stage == S - 1) or (a.kind == "RECV_F" and a.stage == 0) or \
                    (a.kind == "SEND_B" and a.stage == 0) or (a.kind == "RECV_B" and a.stage == S - 1):
                _fail("every receive has its send", r, a, "there is no stage on the other side")
            seen[(a.kind, a.stage, a.mb)] = (r, i)
    for (kind, s, i), (r, _) in seen.items():
        if kind.startswith("RECV") and _partner(Action(s, kind, i)) not in seen:
            _fail("every receive has its send", r, Action(s, kind, i), f"no {_action(_partner(Action(s, kind, i)))}")
        if kind.startswith("SEND") and _receiver(Action(s, kind, i)) not in seen:
            _fail("every send has its receive", r, Action(s, kind, i), f"no {_action(_receiver(Action(s, kind, i)))}")
    has_backward = any(k in ("B", "I", "W") for k, _, _ in seen)
    for s in range(S):
        r = schedule.rank_of(s)
        for i in range(m):
            at = {k: seen[(k, s, i)][1] for k in KINDS if (k, s, i) in seen}  # kind -> position on rank r
            if "F" not in at:
                _fail("every forward runs", r, Action(s, "F", i), "missing")
            if has_backward and "B" in at and ("I" in at or "W" in at):
                _fail("one backward", r, Action(s, "B", i), "both a full backward B and a split one I/W")
            if has_backward and "B" not in at and not ("I" in at and "W" in at):
                _fail("every backward runs", r, Action(s, "I" if "I" not in at else "W", i), "missing")
            back = "B" if "B" in at else "I"
            if back in at and at[back] < at["F"]:
                _fail("forward before backward", r, Action(s, back, i), f"comes before {s}F{i}")
            if "W" in at and at["W"] < at["I"]:
                _fail("input gradient before weight gradient", r, Action(s, "W", i), f"comes before {s}I{i}")
            # (message, the compute it serves, must the message come before it, does this stage have it)
            rules = [("RECV_F", "F", True, s > 0), ("SEND_F", "F", False, s < S - 1)]
            if has_backward:
                rules += [("RECV_B", back, True, s < S - 1), ("SEND_B", back, False, s > 0)]
            for comm, work, before, wanted in rules:
                if wanted and comm not in at:
                    _fail("every message is sent and received", r, Action(s, comm, i), "missing")
                if wanted and (at[comm] > at[work] if before else at[comm] < at[work]):
                    _fail("data before use", r, Action(s, comm, i), f"must come {'before' if before else 'after'} "
                          f"{s}{work}{i}")
    return simulate(schedule, cost=1.0).peak_live


def _partner(a: Action) -> tuple:
    """The send that a receive waits for, as (kind, stage, mb)."""
    return ("SEND_F", a.stage - 1, a.mb) if a.kind == "RECV_F" else ("SEND_B", a.stage + 1, a.mb)


def _receiver(a: Action) -> tuple:
    """The receive that takes a send's message, as (kind, stage, mb)."""
    return ("RECV_F", a.stage + 1, a.mb) if a.kind == "SEND_F" else ("RECV_B", a.stage - 1, a.mb)


def _action(key: tuple) -> Action:
    kind, stage, mb = key
    return Action(stage, kind, mb)


def simulate(schedule: Schedule, cost=None, link: float = 0.0) -> Timeline:
    """Play the schedule: compute actions take cost seconds (a number, a dict by kind, or a function of
    the action), a message arrives `link` seconds after its send. ValueError on a deadlock."""
    if cost is None:
        cost = DEFAULT_COST
    duration = cost if callable(cost) else (lambda a: cost[a.kind]) if isinstance(cost, dict) else (lambda a: cost)
    p = schedule.p
    clock, pos = [0.0] * p, [0] * p
    sent: dict[tuple, float] = {}  # (kind, stage, mb) of a send -> arrival time
    events: list[list] = [[] for _ in range(p)]
    live, peak = [0] * p, [0] * p
    while True:
        moved = False
        for r in range(p):
            while pos[r] < len(schedule.ranks[r]):
                a = schedule.ranks[r][pos[r]]
                if a.kind.startswith("RECV"):
                    if _partner(a) not in sent:
                        break  # blocked: the data is not there yet
                    clock[r] = max(clock[r], sent[_partner(a)])
                elif a.kind.startswith("SEND"):
                    sent[(a.kind, a.stage, a.mb)] = clock[r] + link
                else:
                    start = clock[r]
                    clock[r] += duration(a)
                    events[r].append((a, start, clock[r]))
                    live[r] += 1 if a.kind == "F" else -1 if a.kind in ("B", "W") else 0
                    peak[r] = max(peak[r], live[r])
                pos[r] += 1
                moved = True
        if all(pos[r] == len(schedule.ranks[r]) for r in range(p)):
            break
        if not moved:
            waiting = [(r, schedule.ranks[r][pos[r]]) for r in range(p) if pos[r] < len(schedule.ranks[r])]
            r, a = waiting[0]
            _fail("no deadlock", r, a, f"waits for {_action(_partner(a))}, which is never sent; blocked: "
                  + ", ".join(f"rank {q} at {b}" for q, b in waiting))
    forward_only = not any(a.kind != "F" for ev in events for a, _, _ in ev)
    return Timeline(p, events, [0] * p if forward_only else peak)
