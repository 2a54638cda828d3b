"""LLaVA's question files (what `llava/eval/model_vqa_loader.py` reads): `shortv eval`
answers them, and `shortv lc` takes their lines as calibration samples, so the line,
record and image-path readers here serve both.

One JSON object per line: `question_id`, `image` (a path relative to the image folder, or
absolute; a list for several images; absent for a text-only question), `text` (the
question, used as the user turn). An optional `answer` (a string, or a list of the human
answers) enables scoring; every other field is carried to the answer file's `metadata`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

QUESTION_KEYS = frozenset({"question_id", "image", "text", "answer"})


@dataclass(frozen=True)
class Question:
    """One question: its id, prompt text, image paths (resolved), optional reference
    answer(s), the question file's other fields, and where it came from (file:line)."""

    question_id: Any
    text: str
    images: tuple[Path, ...] = ()
    answer: str | tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def is_question_record(record: object) -> bool:
    """Whether a JSON line is in the question-file format (it has a question_id)."""
    return isinstance(record, dict) and "question_id" in record


def read_questions(
    path: str | os.PathLike, *, image_folder: str | os.PathLike | None = None,
    limit: int | None = None,
) -> list[Question]:
    """Questions from a question file, in file order. Relative image paths resolve against
    `image_folder` (default: the question file's folder). Every problem is an InputError
    naming the file and line: bad JSON, a missing or repeated question_id, a missing
    `text`, an image that is not there."""
    path = Path(path)
    folder = Path(image_folder).expanduser() if image_folder is not None else path.parent
    if image_folder is not None and not folder.is_dir():
        raise InputError(f"--image-folder {image_folder} is not a directory")
    lines = read_lines(path, "question file")
    questions: list[Question] = []
    seen: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = parse_line(line, where)
        questions.append(question_from_record(record, where, folder, seen))
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise InputError(f"{path} holds no questions; expected JSON lines like "
                         '{"question_id": 1, "image": "cat.jpg", "text": "What is it?"}')
    return questions


def parse_line(line: str, where: str) -> dict[str, Any]:
    """One JSON object from a line, or InputError naming the line."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise InputError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def question_from_record(
    record: dict[str, Any], where: str, folder: Path, seen: dict[str, str] | None = None
) -> Question:
    """A Question from one question-file object (see the module docstring)."""
    if "question_id" not in record:
        raise InputError(f'{where}: no "question_id"')
    qid = record["question_id"]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise InputError(f"{where}: question_id must be a string or an integer, got {qid!r}")
    if seen is not None:
        key = json.dumps(qid)
        if key in seen:
            raise InputError(f"{where}: question_id {qid!r} repeats the one at {seen[key]}")
        seen[key] = where
    text = record.get("text")
    if not isinstance(text, str):
        raise InputError(f'{where}: "text" (the question) must be a string')
    return Question(qid, text, resolve_images(record.get("image"), folder, where),
                    _answer(record.get("answer"), where),
                    {k: v for k, v in record.items() if k not in QUESTION_KEYS}, where)


def resolve_images(value: object, folder: Path, where: str) -> tuple[Path, ...]:
    """The image path(s) of a record, resolved against `folder` and checked to exist."""
    if value is None:
        return ()
    images = [value] if isinstance(value, str) else value
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise InputError(f'{where}: "image" must be a path or a list of paths')
    resolved = []
    for image in images:
        p = Path(image).expanduser()
        p = p if p.is_absolute() else folder / p
        if not p.is_file():
            raise InputError(f"{where}: image not found: {image} (looked at {p})")
        resolved.append(p)
    return tuple(resolved)


def _answer(value: object, where: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise InputError(f'{where}: "answer" must be a string or a list of strings')


def read_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from None
