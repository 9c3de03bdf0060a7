"""Progress bars for long runs: sparse updates, and a last line that shows the final state.

A text bar (tqdm's standard one, on stdout) rather than a notebook widget: its final state is plain
text saved in the notebook, so a committed lesson shows "300/300" and not a widget frozen at 0%, and
at most one update per `mininterval` seconds keeps a busy kernel's output channel from flooding.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(iterable=None, desc: str = "", total: int | None = None, enabled: bool = True,
                 mininterval: float = 5.0, **kw):
    """tqdm over `iterable` with at most one redraw per `mininterval` seconds; enabled=False: silent."""
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, mininterval=mininterval,
                file=sys.stdout, dynamic_ncols=False, ncols=100, **kw)
