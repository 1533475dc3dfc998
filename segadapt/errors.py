"""One line for the user, whatever process or thread the error came from.

torch re-raises an error of a DataLoader worker in the main process with the worker's whole stack in the message
(``Caught ValueError in DataLoader worker process 0.\\nOriginal Traceback (most recent call last): ...``); a child
process or thread may hand back the same. :func:`one_line` turns any of these into the original message alone, on
one line, so ``segadapt`` prints ``error: <file>: <problem>`` and exits 2; ``--verbose`` still prints the full stack.
"""

from __future__ import annotations

import re

_ORIGINAL = "Original Traceback (most recent call last):"
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Interrupt|Exit|Warning)|"
                       r"SafetensorError|Fail|InvalidArgument|InvalidProtobuf): (.*)$")
MAX_CHARS = 400


def _original_message(text: str) -> str:
    """The last ``SomeError: message`` line of a formatted stack (the error that was raised first)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        m = _EXC_LINE.match(lines[i].strip())
        if m:
            return " ".join([m.group(2)] + [ln.strip() for ln in lines[i + 1:]])
    return lines[-1].strip() if lines else text


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line: a wrapped worker/child stack reduced to the original error's message,
    other multi-line messages joined, very long ones cut (``--verbose`` shows everything).

    Args:
        e: any exception.

    Returns:
        a single line without a trailing newline; never empty (the type's name when the message is).
    """
    text = str(e)
    if _ORIGINAL in text:
        text = _original_message(text.split(_ORIGINAL, 1)[1])
    text = " ".join(text.split())
    if not text:
        text = type(e).__name__
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS - 1] + "… (--verbose shows all)"
    return text
