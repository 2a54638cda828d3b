"""Conversation templates: how a chat turns into the prompt text LLaVA was trained on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError, InputError
from .qwen_tokenizer import IMAGE_MARKER
from .tokenizer import IMAGE_PLACEHOLDER

Turn = tuple[str, "str | None"]  # (user message, assistant reply or None for the open turn)


STYLES = ("single", "two", "mpt", "llama_2", "plain")


@dataclass(frozen=True)
class Template:
    """A conversation template: one of original LLaVA's separator styles (llava/conversation.py,
    docs/design.md §5.5).

    - "single" (SeparatorStyle.SINGLE): `system + sep`, then `ROLE: message` followed by
      `sep` for every message; the open turn ends `ROLE:`.
    - "two" (SeparatorStyle.TWO): `system + sep`, then `ROLE: message` followed by `sep` after
      user turns and `sep2` after assistant turns; the open turn ends `ROLE:`.
    - "mpt" (SeparatorStyle.MPT, ChatML): `system + sep`, then `role + message + sep` for each
      message, the open turn is the bare role. The roles carry the markers themselves
      ("<|im_start|>user\n"); there is no newline after `sep` ("<|im_end|>").
    - "llama_2" (SeparatorStyle.LLAMA_2): user turns `sep + "[INST] " + message + " [/INST]"`,
      replies `" " + reply + " " + sep2`; the system, when not empty, is wrapped in
      `<<SYS>>\n...\n<</SYS>>\n\n` before the first user message; leading `sep` stripped.
    - "plain" (SeparatorStyle.PLAIN): the messages alone, each followed by its separator.

    image: what each `<image>` placeholder in a user message becomes. LLaVA keeps the
        placeholder (its tokenizer turns it into the image token); Qwen2-VL's chat template
        writes `<|vision_start|><|image_pad|><|vision_end|>`.
    image_sep: what `place_images` puts after each image it places itself: LLaVA's prompts
        have one `<image>` line per image, Qwen2-VL's template nothing between an image
        item and the text that follows.
    """

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str
    image: str = IMAGE_PLACEHOLDER
    image_sep: str = "\n"

    def render(self, turns: Sequence[Turn]) -> str:
        """The prompt for a conversation; the last turn's reply is usually None (open)."""
        messages: list[tuple[str, str | None]] = []
        for user, reply in turns:
            messages += [(self.roles[0], user.replace(IMAGE_PLACEHOLDER, self.image)),
                         (self.roles[1], reply)]
        if messages and messages[-1][1] is None and self.style == "plain":
            messages.pop()
        # After user and assistant messages: SINGLE uses sep for both, TWO and PLAIN alternate.
        seps = (self.sep, self.sep) if self.style == "single" else (self.sep, self.sep2)
        if self.style in ("single", "two"):
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
        stop = {"single": self.sep, "two": self.sep2, "mpt": self.sep,
                "llama_2": self.sep}.get(self.style, "")
        return (stop,) if stop.strip() else ()


# LLaVA's conv_vicuna_v1 (`--conv-mode vicuna_v1`, alias `v1`): what LLaVA-1.5 was trained with
# (`--version v1`), what LLaVA's eval scripts and lmms-eval's llava model use.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# LLaVA's conv_llava_v1 and conv_llava_v0: "human" for "user". LLaVA's CLI picks llava_v1 for
# a model name with "v1" in it; the embedded demo was trained with this text.
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# LLaVA's conv_llava_llama_2 (LLaVA on Llama-2-chat).
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

# LLaVA's conv_mpt (LLaVA on MPT) and conv_chatml_direct (LLaVA-NeXT-34B, Nous-Hermes-2-Yi-34B).
MPT_SYSTEM = (
    "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers."
)
CHATML_DIRECT_SYSTEM = "<|im_start|>system\nAnswer the questions."
CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

# Qwen2-VL-Instruct's chat_template.json (also Qwen2.5-VL-Instruct's): ChatML whose turns end
# "<|im_end|>\n", with this system message when the conversation brings none.
QWEN2_VL_SYSTEM = "<|im_start|>system\nYou are a helpful assistant."

# Named as in LLaVA's conv_templates.
TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template("vicuna_v1", VICUNA_V1_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "llava_v1": Template("llava_v1", LLAVA_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "llava_v0": Template("llava_v0", LLAVA_SYSTEM, ("Human", "Assistant"), "single", "###", ""),
    "llava_llama_2": Template("llava_llama_2", LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"),
                              "llama_2", "<s>", "</s>"),
    # LLaVA-NeXT-Mistral-7B: LLaVA's conv_mistral_instruct (no system, "[INST] ... [/INST]").
    "mistral_instruct": Template("mistral_instruct", "", ("USER", "ASSISTANT"), "llama_2", "",
                                 "</s>"),
    "chatml_direct": Template("chatml_direct", CHATML_DIRECT_SYSTEM, CHATML_ROLES, "mpt",
                              "<|im_end|>", ""),
    "mpt": Template("mpt", MPT_SYSTEM, CHATML_ROLES, "mpt", "<|im_end|>", ""),
    "plain": Template("plain", "", ("", ""), "plain", "\n", "\n"),
    "qwen2_vl": Template("qwen2_vl", QWEN2_VL_SYSTEM, CHATML_ROLES, "mpt", "<|im_end|>\n", "",
                         image=IMAGE_MARKER, image_sep=""),
}

# Other names LLaVA's conv_templates gives the same template.
ALIASES = {"v1": "vicuna_v1"}

def get_template(name: str) -> Template:
    """The template of that name (`TEMPLATES`, or an alias: `v1` is `vicuna_v1`);
    ConfigError naming the known ones."""
    try:
        return TEMPLATES[ALIASES.get(name, name)]
    except KeyError:
        known = [*TEMPLATES, *(f"{a} (= {t})" for a, t in ALIASES.items())]
        raise ConfigError(
            f"unknown conversation template {name!r}; available: {', '.join(known)}"
        ) from None


def place_images(texts: Sequence[str], n_images: int, template: Template | None = None
                 ) -> list[str]:
    """The user texts that `n_images` images belong to, with the images placed: when no
    text has an `<image>` placeholder, one `<image>` per image at the start of the first
    text, each followed by the template's `image_sep` (LLaVA's: a newline, one line per
    image, where LLaVA's prompts have them); otherwise the texts as they are, and the
    caller checks that their placeholders match the images. `LLaVA.encode` places a
    conversation's images so, the server each user message's."""
    if n_images == 0 or any(IMAGE_PLACEHOLDER in text for text in texts):
        return list(texts)
    after = "\n" if template is None else template.image_sep
    return [(IMAGE_PLACEHOLDER + after) * n_images + texts[0], *texts[1:]]


def llava_model_name(model_path: str) -> str:
    """The model name LLaVA derives from a path or repo id (mm_utils.get_model_name_from_path):
    the last path component, or `parent_checkpoint-N` for a training checkpoint folder."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def cli_template_name(model_path: str) -> str:
    """The template LLaVA's CLI (llava/serve/cli.py, eval/run_llava.py) picks for a model
    path or repo id, from its lowercased model name; the first check that matches wins."""
    name = llava_model_name(model_path).lower()
    for needle, template in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"),
                             ("v1.6-34b", "chatml_direct"), ("v1", "llava_v1"), ("mpt", "mpt")):
        if needle in name:
            return template
    return "llava_v0"
