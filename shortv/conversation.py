"""Conversation templates: how a chat turns into the prompt text LLaVA was trained on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError

Turn = tuple[str, "str | None"]  # (user message, assistant reply or None for the open turn)


@dataclass(frozen=True)
class Template:
    """A conversation template.

    style "two" (LLaVA's SeparatorStyle.TWO): system, `sep`, then `ROLE: message` with
    `sep` after user turns and `sep2` after assistant turns; the open turn ends `ROLE:`.
    style "plain": the messages alone, each followed by its separator.
    """

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str

    def render(self, turns: Sequence[Turn]) -> str:
        """The prompt for a conversation; the last turn's reply is usually None (open)."""
        messages: list[tuple[str, str | None]] = []
        for user, reply in turns:
            messages += [(self.roles[0], user), (self.roles[1], reply)]
        if messages and messages[-1][1] is None and self.style == "plain":
            messages.pop()
        seps = (self.sep, self.sep2)
        if self.style == "two":
            text = self.system + self.sep
            for i, (role, message) in enumerate(messages):
                text += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
            return text
        if self.style == "plain":
            return self.system + "".join(
                message + seps[i % 2] for i, (_, message) in enumerate(messages) if message
            )
        raise ConfigError(f"template {self.name!r} has unknown style {self.style!r}")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends an assistant reply (besides the EOS token)."""
        stop = self.sep2 if self.style == "two" else ""
        return (stop,) if stop.strip() else ()


VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "plain": Template("plain", "", ("", ""), "plain", "\n", "\n"),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"unknown conversation template {name!r}; available: {', '.join(TEMPLATES)}"
        ) from None
