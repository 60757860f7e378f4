"""The progress protocol: how a durable run tells its caller how far it is.

The engine calls ``start(total, reused)`` once it knows its batches (``reused`` of the ``total``
are finished already: a resumed run), ``advance()`` after each batch it computes, and ``finish()``
when the last one is done. The command line's progress bar implements it
(:class:`ngdiag.cli.common.Progress`); a plain function ``f(done, total)`` is accepted too.
"""

from __future__ import annotations

from typing import Callable, Protocol, Union, runtime_checkable

__all__ = ["RunProgress", "as_progress"]


@runtime_checkable
class RunProgress(Protocol):
    """What a durable run reports while it works."""

    def start(self, total: int, reused: int) -> None:
        """The run has ``total`` batches to go through, of which ``reused`` are done already."""

    def advance(self, n: int = 1) -> None:
        """``n`` more batches are computed."""

    def finish(self) -> None:
        """Every batch is done (the result is being joined and saved)."""


class _Silent:
    def start(self, total: int, reused: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass


class _Callback(_Silent):
    """``f(done, total)`` after the start (when batches are reused) and after every batch."""

    def __init__(self, f: Callable[[int, int], None]):
        self.f = f
        self.done = self.total = 0

    def start(self, total: int, reused: int) -> None:
        self.done, self.total = int(reused), int(total)
        if self.done:
            self.f(self.done, self.total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.f(self.done, self.total)


def as_progress(progress: Union[RunProgress, Callable[[int, int], None], None]) -> RunProgress:
    """``progress`` as a :class:`RunProgress`: itself, a function ``f(done, total)`` wrapped, or ``None`` (silent)."""
    if progress is None:
        return _Silent()
    if isinstance(progress, RunProgress):
        return progress
    if callable(progress):
        return _Callback(progress)
    raise TypeError(f"progress must have start/advance/finish or be a function f(done, total), got {type(progress).__name__}")


