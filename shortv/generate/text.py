"""From generated token ids to answer text, as original LLaVA printed it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TextAssembler:
    """Turns a growing list of token ids into text: strips like original LLaVA, cuts at
    stop strings, and only releases text that later tokens cannot change (an incomplete
    UTF-8 character, or a possible start of a stop string, is held back)."""

    decode: Callable[[list[int]], str]
    stops: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    stopped: bool = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids).lstrip()
        found = [at for stop in self.stops if (at := text.find(stop)) >= 0]
        if found:  # the earliest stop string wins, whatever the order they were given in
            text, self.stopped = text[: min(found)], True
        self.text = text

    def final(self) -> str:
        return self.text.strip()

    def settled(self) -> str:
        """The prefix of the text that no later token can change."""
        if self.stopped:
            return self.final()
        text = self.text.rstrip()
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        return text[: len(self.text) - hold] if hold else text
