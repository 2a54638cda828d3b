"""LLaVA's answer files, written so that a run can stop anywhere and resume — but only
the same run.

One object per question, in question order: `question_id`, `prompt` (the question text),
`text` (the answer), `answer_id`, `model_id`, `metadata` — what LLaVA's own conversion and
scoring scripts read. `metadata` holds the question file's other fields, plus, under the
key "shortv" (`PROVENANCE_KEY`), the record of the run that produced the answer: model,
method with all its options, template, generation options, dtype and shortv version
(`shortv.eval.provenance`). A question field named "shortv" is refused.

Lines are appended and flushed as answers are produced, each in one write. A rerun resumes
the file only if every line's record matches the run's (`AnswerFile`); otherwise it fails,
naming the first field that differs, before anything is written, and `overwrite` starts
afresh. A resumed run keeps the complete lines already there (a truncated last line, from
a run that was killed mid-write, is cut off at the first write), skips their questions,
and at the end the file is rewritten in question order if it is not already.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..questions import Question
from .provenance import difference as provenance_difference

ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")
PROVENANCE_KEY = "shortv"  # metadata[PROVENANCE_KEY]: the run's record
# answer_id is a UUID derived from the model and question, so reruns and data-parallel
# runs write byte-identical files (LLaVA draws a random shortuuid; any unique id will do).
_NAMESPACE = uuid.UUID("5b0c9d1e-7f3a-4b7e-9a51-5f2c1e0d8a11")


def key(question_id: Any) -> str:
    """A question id as a dictionary key that keeps 1 and "1" apart."""
    return json.dumps(question_id)


def answer_record(question: Question, text: str, model_id: str,
                  provenance: dict[str, Any]) -> dict[str, Any]:
    """The answer file's object for one answered question, produced by the run that
    `provenance` records (`shortv.eval.provenance`)."""
    answer_id = uuid.uuid5(_NAMESPACE, f"{model_id}\n{key(question.question_id)}")
    return {"question_id": question.question_id, "prompt": question.text, "text": text,
            "answer_id": answer_id.hex, "model_id": model_id,
            "metadata": {**question.metadata, PROVENANCE_KEY: provenance}}


class AnswerFile:
    """An answer file being filled: what it already holds, and appending to it.

    Opening one reads the file and raises InputError, writing nothing, when it cannot be
    resumed by the run that `provenance` records: a line that is not an answer, an
    answer to a question not asked, a line whose record differs from `provenance` (only
    the fields `provenance` holds are compared) or that has none. `overwrite`: ignore
    what the file holds; the first write replaces it. `limit`: the questions are the
    first `limit` of their file (--limit), so answers to later ones may be there too;
    when every question asked is answered they are left alone (nothing to do), otherwise
    they are an error as any foreign answer.
    """

    def __init__(self, path: str | os.PathLike, questions: Sequence[Question],
                 provenance: dict[str, Any], *, limit: int | None = None,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        self.order = [key(q.question_id) for q in questions]
        self.done: dict[str, dict[str, Any]] = {}
        self.beyond_limit = 0  # answers held to questions after the first `limit`
        self._replace = overwrite  # the first write starts the file afresh
        self._truncated = False  # a killed run's partial last line waits to be cut off
        _check_metadata(questions)
        _check_folder(self.path)
        if not overwrite and self.path.exists():
            self._read_existing(provenance, limit)

    def _read_existing(self, provenance: dict[str, Any], limit: int | None) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a truncated last line is dropped
        self._truncated = len(complete) != len(data)
        lines = [(f"{self.path}:{number}", _parse(line, f"{self.path}:{number}"))
                 for number, line in enumerate(complete.decode("utf-8", "replace").splitlines(), start=1)
                 if line.strip()]
        known = set(self.order)
        foreign = [(where, r) for where, r in lines if key(r["question_id"]) not in known]
        self.done = {key(r["question_id"]): r for _, r in lines if key(r["question_id"]) in known}
        if foreign:
            self._allow_beyond_limit(foreign, limit)
        for index, (where, record) in enumerate(lines):
            metadata = record.get("metadata")
            recorded = metadata.get(PROVENANCE_KEY) if isinstance(metadata, dict) else None
            if recorded is None:
                raise InputError(
                    f"{where} has no record of the run that wrote it (metadata.{PROVENANCE_KEY}: "
                    "an older shortv or another tool), so resuming could mix runs; use "
                    "--overwrite to start afresh, or another --answers-out")
            differs = provenance_difference(recorded, provenance)
            if differs is not None:
                raise InputError(
                    f"{self.path if index == 0 else where} was written by a run with {differs}; "
                    "use --overwrite to start afresh, or another --answers-out")

    def _allow_beyond_limit(self, foreign: list[tuple[str, dict[str, Any]]], limit: int | None) -> None:
        where, record = foreign[0]
        qid = record["question_id"]
        if limit is None:
            raise InputError(f"{where} answers question_id {qid!r}, which is not in the question "
                             "file; use another --answers-out")
        if self.remaining:
            raise InputError(
                f"{where} answers question_id {qid!r}, which is not among the first {limit} "
                f"questions (--limit {limit}), while some of those are unanswered: is it the "
                "answer file of another question file? Use another --answers-out")
        self.beyond_limit = len(foreign)

    @property
    def remaining(self) -> set[str]:
        return set(self.order) - set(self.done)

    @property
    def held(self) -> int:
        """Answers in the file: to the questions asked, and to any beyond --limit."""
        return len(self.done) + self.beyond_limit

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append answers, one write per line, flushed to disk before returning."""
        if self._truncated:
            self._rewrite()  # repair: keep only the complete lines
        mode, self._replace = ("w" if self._replace else "a"), False
        with open(self.path, mode, encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.done[key(record["question_id"])] = record
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """Rewrite the file in question order, if it is not in that order already (a file
        holding answers beyond --limit is left as it is: nothing was added to it)."""
        if self.beyond_limit:
            return
        if self._replace or not self.path.exists():  # nothing was answered: nothing to write
            return
        if self._truncated:
            self._rewrite()
            return
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
        self._truncated = False


def _check_folder(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"--answers-out {path} is a directory")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist")


def _check_metadata(questions: Sequence[Question]) -> None:
    for q in questions:
        if PROVENANCE_KEY in q.metadata:
            raise InputError(f'{q.where}: the field "{PROVENANCE_KEY}" is reserved for the answer '
                             "file's record of the run; rename it")


def _parse(line: str, where: str) -> dict[str, Any]:
    """One answer line, or InputError naming it."""
    try:
        record = json.loads(line)
    except ValueError:
        raise InputError(f"{where} is not an answer line (bad JSON); is this the answer "
                         "file of another run? Use another --answers-out") from None
    if not isinstance(record, dict) or "question_id" not in record:
        raise InputError(f"{where} is not an answer line (no question_id)")
    return record
