"""Conversation templates: how a chat turns into the prompt text LLaVA was trained on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError, InputError

Turn = tuple[str, "str | None"]  # (user message, assistant reply or None for the open turn)


STYLES = ("two", "mpt", "llama_2", "plain")


@dataclass(frozen=True)
class Template:
    """A conversation template: one of original LLaVA's separator styles (llava/conversation.py,
    docs/design.md §5.5).

    - "two" (SeparatorStyle.TWO): `system + sep`, then `ROLE: message` followed by `sep` after
      user turns and `sep2` after assistant turns; the open turn ends `ROLE:`.
    - "mpt" (SeparatorStyle.MPT, ChatML): `system + sep`, then `role + message + sep` for each
      message, the open turn is the bare role. The roles carry the markers themselves
      ("<|im_start|>user\n"); there is no newline after `sep` ("<|im_end|>").
    - "llama_2" (SeparatorStyle.LLAMA_2): user turns `sep + "[INST] " + message + " [/INST]"`,
      replies `" " + reply + " " + sep2`; the system, when not empty, is wrapped in
      `<<SYS>>\n...\n<</SYS>>\n\n` before the first user message; leading `sep` stripped.
    - "plain" (SeparatorStyle.PLAIN): the messages alone, each followed by its separator.
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
        if self.style == "mpt":
            text = self.system + self.sep
            for role, message in messages:
                text += role + message + self.sep if message else role
            return text
        if self.style == "llama_2":
            return self._llama_2(messages)
        if self.style == "plain":
            return self.system + "".join(
                message + seps[i % 2] for i, (_, message) in enumerate(messages) if message
            )
        raise ConfigError(f"template {self.name!r} has unknown style {self.style!r}; "
                          f"known styles: {', '.join(STYLES)}")

    def _llama_2(self, messages: list[tuple[str, str | None]]) -> str:
        if not messages or not messages[0][1]:
            raise InputError(f"template {self.name!r} needs a non-empty first user message")
        text = ""
        for i, (_, message) in enumerate(messages):
            if not message:
                continue
            if i == 0 and self.system:
                message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{message}"
            if i % 2 == 0:
                text += f"{self.sep}[INST] {message} [/INST]"
            else:
                text += f" {message} {self.sep2}"
        # LLaVA strips its leading separator with str.lstrip, which removes any of its
        # characters; an empty separator strips nothing.
        return text.lstrip(self.sep) if self.sep else text

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends an assistant reply (besides the EOS token): LLaVA's stop string,
        `sep2` for style "two", else `sep` (none when it is blank; none for "plain")."""
        stop = {"two": self.sep2, "mpt": self.sep, "llama_2": self.sep}.get(self.style, "")
        return (stop,) if stop.strip() else ()


# LLaVA's conv_llava_v1 text, which LLaVA's CLI picks for v1.5 models; its conv_vicuna_v1
# (training and benchmark scripts) says "user" for "human" (docs/design.md §5.5).
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# LLaVA-NeXT-34B (Nous-Hermes-2-Yi-34B): LLaVA's conv_chatml_direct.
CHATML_DIRECT_SYSTEM = "<|im_start|>system\nAnswer the questions."

TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    # LLaVA-NeXT-Mistral-7B: LLaVA's conv_mistral_instruct (no system, "[INST] ... [/INST]").
    "mistral_instruct": Template("mistral_instruct", "", ("USER", "ASSISTANT"), "llama_2", "",
                                 "</s>"),
    "chatml_direct": Template("chatml_direct", CHATML_DIRECT_SYSTEM,
                              ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt",
                              "<|im_end|>", ""),
    "plain": Template("plain", "", ("", ""), "plain", "\n", "\n"),
}


def get_template(name: str) -> Template:
    """The template of that name (`TEMPLATES`); ConfigError naming the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"unknown conversation template {name!r}; available: {', '.join(TEMPLATES)}"
        ) from None
