"""OpenAI's chat-completions format: requests in, responses, stream chunks and errors out.

`parse_chat_request` checks a request body against the subset of the API that shortv
serves and turns it into a `ChatRequest`: the conversation rendered with the model's
template (image placeholders in place), the decoded images, and the generation options.
Every way a request can be wrong is a `RequestError` (`errors`) carrying its HTTP status
and a message, which the app sends in OpenAI's error shape.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from ..conversation import Template, place_images
from ..generate.sampling import GenerationOptions
from ..tokenizer import IMAGE_PLACEHOLDER
from .errors import RequestError, bad
from .images import load_image_url
from .limits import Limits

MAX_STOP_STRINGS = 4  # as OpenAI's API


@dataclass
class ChatRequest:
    """A checked chat request: the prompt text (template applied, one `<image>` per
    image), its images, how to generate, and how to answer."""

    model: str
    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    options: GenerationOptions = field(default_factory=GenerationOptions)
    max_tokens_given: bool = False  # an explicit max_tokens must fit the context
    stream: bool = False
    include_usage: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    method: str | None = None  # shortv's extension: "NAME[+NAME] [PARAM=VALUE ...]", None: the server's


# Parameters of OpenAI's API that shortv does not implement, with the value that means
# "not used" (a request may send that value; any other is refused).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "prediction": (None,),
}


def parse_chat_request(body: bytes, *, model_name: str, template: Template, limits: Limits) -> ChatRequest:
    """Check a `POST /v1/chat/completions` body; RequestError says what is wrong.

    Decodes the images (data: URLs, or local paths under `limits.image_root`), so call it
    off the event loop."""
    if len(body) > limits.max_body_bytes:
        raise body_too_large(limits.max_body_bytes)
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise bad(f"the request body must be a JSON object, got {_kind(request)}")
    model = request.get("model")
    if not isinstance(model, str):
        raise bad("'model' is required and must be a string", "model")
    if model != model_name:
        raise RequestError(404, f"the model {_show(model)} does not exist; this server serves "
                                f"{_show(model_name)} (GET /v1/models)", param="model",
                           code="model_not_found")
    n = request.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad(f"n must be 1, got {_show(n)}: this server answers each request with one choice", "n")
    for name, unused in UNSUPPORTED.items():
        if name in request and request[name] not in unused:
            raise bad(f"{name} is not supported by this server", name)
    response_format = request.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad('only response_format {"type": "text"} is supported', "response_format")

    stream = _optional(request, "stream", bool) or False
    stream_options = _optional(request, "stream_options", dict)
    if stream_options is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    include_usage = (stream_options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage must be a boolean", "stream_options")

    options, given = _options(request, limits)
    system, turns, images = _conversation(request.get("messages"), limits, template)
    if system is not None:
        template = with_system(template, system)
    method = _optional(request, "method", str)
    if method is not None and not (0 < len(method.strip()) <= 200):
        raise bad("method must be a method entry of at most 200 characters, e.g. \"fastv k=2 r=0.5\"",
                  "method")
    return ChatRequest(model, template.render(turns), images, options, given, stream, include_usage,
                       _logit_bias(request), method)


def body_too_large(limit: int) -> RequestError:
    return bad(f"the request body is over this server's limit of {limit} bytes "
               "(--max-body-mb)", code="request_too_large")


def _options(request: dict[str, Any], limits: Limits) -> tuple[GenerationOptions, bool]:
    """The generation options, and whether max_tokens was given."""
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        value = _optional(request, name, int)
        if value is not None:
            if value < 1:
                raise bad(f"{name} must be at least 1, got {value}", name)
            if value > limits.max_tokens:
                raise bad(f"{name} is {value}, more than this server's limit of {limits.max_tokens} "
                          "(--max-tokens-limit)", name)
            max_tokens = max_tokens or value
    temperature = _in_range(request, "temperature", 0, 2)
    top_p = _in_range(request, "top_p", 0, 1)
    if top_p == 0:  # only the most likely token: greedy
        temperature, top_p = 0.0, None
    seed = _optional(request, "seed", int)
    stop = request.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise bad("stop must be a string or a list of strings", "stop")
    if stop is not None and len(stop) > MAX_STOP_STRINGS:
        raise bad(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    # Greedy unless asked otherwise, like `model.chat` (OpenAI's own default is 1).
    options = GenerationOptions(max_new_tokens=max_tokens or limits.max_tokens,
                                temperature=temperature or 0.0, top_p=top_p, seed=seed,
                                stop=tuple(s for s in stop or () if s))
    return options, max_tokens is not None


def _in_range(request: dict[str, Any], name: str, low: float, high: float) -> float | None:
    """A number in [low, high], refused outside it with OpenAI's error codes."""
    value = _optional(request, name, float)
    if value is not None and value > high:
        raise bad(f"{name} must be at most {high:g}, got {value:g}", name, "decimal_above_max_value")
    if value is not None and value < low:
        raise bad(f"{name} must be at least {low:g}, got {value:g}", name, "decimal_below_min_value")
    return value


def _logit_bias(request: dict[str, Any]) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (as strings) to numbers in [-100, 100], added to the
    logits before each token is picked (-100 bans a token, 100 all but forces it)."""
    value = _optional(request, "logit_bias", dict) or {}
    bias = {}
    for key, number in value.items():
        if not (key.isascii() and key.isdigit()):
            raise bad(f"logit_bias keys must be token ids, got {_show(key)}", "logit_bias")
        if not isinstance(number, (int, float)) or isinstance(number, bool) or not -100 <= number <= 100:
            raise bad(f"logit_bias[{key}] must be a number in [-100, 100], got {_show(number)}", "logit_bias")
        bias[int(key)] = float(number)
    return bias


def _conversation(messages: Any, limits: Limits, template: Template
                  ) -> tuple[str | None, list[tuple[str, str | None]], list[Image.Image]]:
    """(system text or None, (user, reply) turns with the last reply None, images in order).

    A user message's images get `<image>` placeholders at the start of its text, as
    `model.chat` places them, unless the text has exactly as many placeholders itself.
    Consecutive messages of one role are joined with a newline."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' is required and must be a non-empty list of messages", "messages")
    system: list[str] = []
    merged: list[tuple[str, str]] = []  # (role, text) with user/assistant alternating
    images: list[Image.Image] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with 'role' and 'content', got {_kind(message)}", where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role must be \"system\", \"user\" or \"assistant\", got {_show(role)}",
                      f"{where}.role")
        texts, urls = _content(message.get("content"), where, images_allowed=role == "user")
        text = "\n".join(texts)
        if role in ("system", "developer"):
            system.append(text)
            continue
        if IMAGE_PLACEHOLDER in text and role == "assistant":
            raise bad(f"{where}: {IMAGE_PLACEHOLDER} may only appear in user messages", f"{where}.content")
        if len(images) + len(urls) > limits.max_images:
            raise bad(f"the request has more than {limits.max_images} images, this server's limit "
                      "(--max-images)", "messages")
        for j, url in enumerate(urls):
            images.append(load_image_url(url, limits, f"{where}.content image {j}"))
        if role == "user":
            (text,) = place_images([text], len(urls), template)
            placed = text.count(IMAGE_PLACEHOLDER)
            if placed != len(urls):
                raise bad(f"{where} has {placed} {IMAGE_PLACEHOLDER} placeholder(s) but {len(urls)} "
                          "image(s)", f"{where}.content")
        if merged and merged[-1][0] == role:
            merged[-1] = (role, merged[-1][1] + "\n" + text)
        else:
            merged.append((role, text))
    if not merged or merged[0][0] != "user":
        raise bad("the conversation must start with a user message (after any system message)", "messages")
    if merged[-1][0] != "user":
        raise bad("the last message must be from the user", "messages")
    turns: list[tuple[str, str | None]] = []
    for k in range(0, len(merged), 2):
        reply = merged[k + 1][1] if k + 1 < len(merged) else None
        turns.append((merged[k][1], reply))
    return ("\n".join(system) if system else None), turns, images


def _content(content: Any, where: str, *, images_allowed: bool) -> tuple[list[str], list[str]]:
    """(texts, image URLs) of a message's content: a string, or a list of parts."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content parts, got {_kind(content)}",
                  f"{where}.content")
    texts, urls = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{at}.text must be a string", at)
            texts.append(part["text"])
        elif kind == "image_url":
            if not images_allowed:
                raise bad(f"{at}: images are only allowed in user messages", at)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad(f"{at}.image_url must be an object with a 'url' string", at)
            urls.append(url)
        else:
            got = f"type {_show(kind)}" if isinstance(part, dict) else _kind(part)
            raise bad(f"{at} must be a \"text\" or \"image_url\" part, got {got}", at)
    return texts, urls


def with_system(template: Template, system: str) -> Template:
    """The template with the conversation's own system message. ChatML templates (style
    "mpt") keep their `<|im_start|>system` header."""
    header = "<|im_start|>system\n"
    if template.style == "mpt" and template.system.startswith(header):
        return replace(template, system=header + system)
    return replace(template, system=system)


def _optional(request: dict[str, Any], name: str, kind: type) -> Any:
    """request[name] when present and not null, checked to be of `kind`."""
    value = request.get(name)
    if value is None:
        return None
    if kind is int and _is_int(value):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value):
        return float(value)
    if kind in (bool, dict, str) and isinstance(value, kind):
        return value
    names = {int: "an integer", float: "a number", bool: "a boolean", dict: "an object", str: "a string"}
    raise bad(f"{name} must be {names[kind]}, got {_kind(value)} {_show(value)}", name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any, limit: int = 40) -> str:
    """A JSON value as JSON text (never a Python repr), cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """A JSON value's type, in JSON's words."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# ---- responses --------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str) -> str:
    """OpenAI's finish_reason of a shortv one ("eos", "stop", "length")."""
    return "length" if reason == "length" else "stop"


def completion(request_id: str, model: str, text: str, reason: str, prompt_tokens: int,
               completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    """A `chat.completion` object."""
    return {
        "id": request_id, "object": "chat.completion", "created": created or int(time.time()),
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason(reason)}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(request_id: str, model: str, created: int, delta: dict[str, str] | None = None,
          reason: str | None = None, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """A `chat.completion.chunk`: a delta, the final one with its finish_reason, or (with
    stream_options.include_usage) the last one, with no choices and the usage."""
    choices = [] if usage_ is not None else [
        {"index": 0, "delta": delta or {}, "logprobs": None,
         "finish_reason": finish_reason(reason) if reason else None}]
    out: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: ...` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
