"""Text still being written that may be the start of a marker, and so is held back from a stream:
a stop string (output_processor), a tool call's marker (tool_parsers), the end of a reasoning
model's thinking (reasoning)."""

from __future__ import annotations


def holdback(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into one of ``markers``
    (a proper prefix of it: a whole marker is found, not held)."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best
