"""Text of a growing list of generated tokens, a piece at a time, and where stop strings cut it.

Byte-level BPE tokens are bytes, and a character may span tokens: the decoder shows an incomplete UTF-8
sequence as U+FFFD. Text is released only when the undecoded tokens end on a complete character; then
decode(released) + decode(rest) == decode(all), so only the unreleased tokens are decoded each time
(not the whole output, which would cost O(n^2) over a long answer).
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pending: list[int] = []  # tokens whose text is not released yet

    def add(self, token_id: int, final: bool = False) -> str:
        """The text this token completes ("" while a character is still incomplete); final: the last
        token of the output, so whatever is pending is released as it decodes."""
        self._pending.append(token_id)
        text = self.tokenizer.decode(self._pending)
        if text.endswith(REPLACEMENT) and not final:
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        """What is still held back (the output ended on an incomplete character)."""
        text = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending.clear()
        return text


class StopStrings:
    """Finds the first stop string in a growing text. Text that may be the start of a stop string is
    held back from streaming (at most the longest stop string minus one character), so a client never
    sees text that a stop string then takes back."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def find(self, text: str, new_from: int) -> int | None:
        """Index of the earliest stop string that ends at or after new_from (the first new character)."""
        start = max(0, new_from - self.hold)
        found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def releasable(self, text: str) -> int:
        """How much of an unfinished text can be streamed now."""
        return max(0, len(text) - self.hold)
