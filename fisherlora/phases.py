"""Which phase of a job was running when an exception escaped it: a note on the exception
(PEP 678 ``__notes__``, shown under its traceback), which the command reads to say in one line
where and in which memory mode a job failed."""

from __future__ import annotations

import contextlib

__all__ = ["phase", "failed_phase"]

_PREFIX = "fisherlora phase: "


@contextlib.contextmanager
def phase(what: str):
    """Mark the block as the phase ``what`` (``"the calibration passes (memory_mode=full, layer
    group 1/2)"``): an exception that escapes it, ``KeyboardInterrupt`` included, carries the note
    ``fisherlora phase: <what>`` and is re-raised unchanged otherwise."""
    try:
        yield
    except BaseException as exc:
        # add_note() is Python 3.11+; the attribute is the same thing and works on 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", ()), _PREFIX + what]
        raise


def failed_phase(exc: BaseException) -> str | None:
    """The innermost phase noted on ``exc`` by :func:`phase`, or None."""
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, str) and note.startswith(_PREFIX):
            return note[len(_PREFIX):]
    return None
