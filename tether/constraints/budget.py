"""Time budgets for constraint checks: a deadline that every check of one decoding step obeys.

The AWRS processor runs each particle's step inside ``deadline(seconds)``. Checkers that can
run long (partial matching of non-regular expressions, Python predicates) consult it:

* ``remaining()`` gives the time left (None: no deadline), which partial matching passes to
  the ``regex`` module as its timeout;
* ``check()`` raises ``BudgetExceeded`` once the deadline has passed.

A check that runs out of time raises ``BudgetExceeded``; it never answers "rejected". So the
wall clock can end a particle (with the reason ``budget``), but it never decides whether a token
is accepted: for a given seed, the tokens and weights of every particle that finishes are the
same whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Iterator

from tether.errors import TetherError


class BudgetExceeded(TetherError):
    """A constraint check ran past its time budget (the particle ends with reason ``budget``)."""


_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("tether_deadline",
                                                                          default=None)


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Run the enclosed checks with ``seconds`` of time (None: no limit)."""
    if seconds is None:
        yield
        return
    token = _DEADLINE.set(time.perf_counter() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left before the deadline (None without one); raises once it has passed."""
    end = _DEADLINE.get()
    if end is None:
        return None
    left = end - time.perf_counter()
    if left <= 0:
        raise BudgetExceeded("the constraint ran out of its time budget")
    return left


def check() -> None:
    """Raise ``BudgetExceeded`` if the deadline has passed."""
    remaining()
