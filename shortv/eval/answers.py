"""LLaVA's answer files, written so that a run can stop anywhere and resume.

One object per question, in question order: `question_id`, `prompt` (the question text),
`text` (the answer), `answer_id`, `model_id`, `metadata` — what LLaVA's own conversion and
scoring scripts read. Lines are appended and flushed as answers are produced, each in one
write; a rerun keeps the complete lines already there (a truncated last line, from a run
that was killed mid-write, is cut off), skips their questions, and at the end the file is
rewritten in question order if it is not already.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .questions import Question

ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")
# answer_id is a UUID derived from the model and question, so reruns and data-parallel
# runs write byte-identical files (LLaVA draws a random shortuuid; any unique id will do).
_NAMESPACE = uuid.UUID("5b0c9d1e-7f3a-4b7e-9a51-5f2c1e0d8a11")


def key(question_id: Any) -> str:
    """A question id as a dictionary key that keeps 1 and "1" apart."""
    return json.dumps(question_id)


def answer_record(question: Question, text: str, model_id: str) -> dict[str, Any]:
    """The answer file's object for one answered question."""
    answer_id = uuid.uuid5(_NAMESPACE, f"{model_id}\n{key(question.question_id)}")
    return {"question_id": question.question_id, "prompt": question.text, "text": text,
            "answer_id": answer_id.hex, "model_id": model_id, "metadata": dict(question.metadata)}


class AnswerFile:
    """An answer file being filled: what it already holds, and appending to it."""

    def __init__(self, path: str | os.PathLike, questions: Sequence[Question]) -> None:
        self.path = Path(path)
        self.order = [key(q.question_id) for q in questions]
        self.done: dict[str, dict[str, Any]] = {}
        self._read_existing(set(self.order))

    def _read_existing(self, known: set[str]) -> None:
        if self.path.is_dir():
            raise InputError(f"--answers-out {self.path} is a directory")
        if not self.path.parent.is_dir():
            raise InputError(f"cannot write {self.path}: the folder {self.path.parent} does not exist")
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a truncated last line is dropped
        for number, line in enumerate(complete.decode("utf-8", "replace").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                record = json.loads(line)
            except ValueError:
                raise InputError(f"{where} is not an answer line (bad JSON); is this the answer "
                                 "file of another run? Use another --answers-out") from None
            if not isinstance(record, dict) or "question_id" not in record:
                raise InputError(f"{where} is not an answer line (no question_id)")
            k = key(record["question_id"])
            if k not in known:
                raise InputError(f"{where} answers question_id {record['question_id']!r}, which is "
                                 "not in the question file; use another --answers-out")
            self.done[k] = record
        if len(complete) != len(data):
            self._rewrite()  # repair: keep only the complete lines

    @property
    def remaining(self) -> set[str]:
        return set(self.order) - set(self.done)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append answers, one write per line, flushed to disk before returning."""
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.done[key(record["question_id"])] = record
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """Rewrite the file in question order, if it is not in that order already."""
        on_disk = [key(json.loads(line)["question_id"])
                   for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if on_disk != [k for k in self.order if k in self.done]:
            self._rewrite()

    def _rewrite(self) -> None:
        """Write the answers held, in question order, through a temporary file: a crash
        leaves the old file or the new one, never a mix."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for k in self.order:
                if k in self.done:
                    f.write(json.dumps(self.done[k], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
