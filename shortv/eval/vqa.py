"""VQA answer normalisation and accuracy, with the behaviour of the official VQA evaluation.

The reference is ``vqaEval.py`` of the VQA API (GT-Vision-Lab/VQA, the version after the
2021 "processing answers" fix), whose answer processing is also what LLaVA's
``llava/eval/m4c_evaluator.py`` and lmms-eval's ``EvalAIAnswerProcessor`` reproduce.
:func:`normalize_answer` gives, for every string, the same result as the official
``processDigitArticle(processPunctuation(answer.replace("\\n", " ").replace("\\t", " ").strip()))``:

1. lowercase; newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation: the 21 marks ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` are either deleted or
   turned into a space. A mark is deleted when the text has a thousands-style comma anywhere
   (a digit, a comma, a digit: then *every* mark is deleted, so ``"1,000"`` becomes
   ``"1000"``) or when that mark stands next to a space somewhere in the text (``"red , blue"``
   and ``"red, blue"`` both become ``"red blue"``); otherwise it becomes a space
   (``"black-white"`` becomes ``"black white"``). The decision is made once per mark, on the
   text as it was before any mark was touched. Apostrophes, colons and the other symbols
   (``' : * # $ % & ^ ~ |``) are kept;
3. a full stop is deleted unless a digit follows it (``"3.5"`` is kept, ``"yes."`` becomes
   ``"yes"``, and so does the one in ``"3."``); this runs after step 2;
4. the text is split on whitespace; ``none`` and ``zero`` .. ``ten`` become ``0`` .. ``10``;
   the articles ``a``, ``an`` and ``the`` are dropped; apostrophe-less contractions are
   restored from the official table (``dont`` -> ``don't``, ``isnt`` -> ``isn't``); the words
   are joined with single spaces.

Quirks of the official code that are kept on purpose, so that scores match it:

* its full-stop regex, ``(?!<=\\d)(\\.)(?!\\d)``, was meant to spare full stops after a digit
  too, but ``(?!<=\\d)`` is a look-ahead for the two characters ``<=`` and never fails before a
  ``.``: only a following digit protects a full stop;
* it passes ``re.UNICODE`` (= 32) where ``re.sub`` takes its ``count``, so at most the first
  32 full stops of an answer are deleted;
* the contraction table maps ``somebody'd`` to ``somebodyd`` (the wrong way round) and holds
  keys with capitals (``Im``, ``Ive``, ``Id've``, ``I'dve``) that can never match lowercased
  words, so ``im`` stays ``im``.

Deliberate differences from the official *scoring loop* (not from its normalisation):

* the official ``evaluate`` normalises the answers only when the human answers disagree (when
  all ten are the same string, the prediction is compared after ``strip()`` alone, so
  ``"Yes."`` scores 0 against ten ``"yes"``); here the prediction and every human answer are
  always normalised;
* EvalAI's processor (the LLaVA and lmms-eval copies) runs a ``word_tokenize`` step first that
  also deletes every ``,`` and ``?`` and splits ``'s`` off (``"man's"`` -> ``"man 's"``); that step
  is not part of ``vqaEval.py`` and is not done here.

Accuracy (:func:`vqa_accuracy`) against a list of human answers is ``min(#matches / 3, 1)``
by default: the formula of the VQA paper. The official code instead
averages that formula over the leave-one-out subsets (each of the ten answers left out in
turn, the matches counted among the other nine); ``leave_one_out=True`` gives that number,
which is what the VQA leaderboards report. The two agree at 0 and at 4 or more matches of
ten; for 1, 2 and 3 matches of ten they give 1/3, 2/3, 1 against 0.3, 0.6, 0.9.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import InputError

__all__ = ["normalize_answer", "score", "vqa_accuracy"]

# The marks of the official ``punct`` list, in its order.
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')

# The official number map (``manualMap``) and articles.
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBER_WORDS: dict[str, str] = {word: str(value) for value, word in enumerate(_DIGIT_NAMES)}
NUMBER_WORDS["none"] = "0"
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official contraction table, entry for entry (in its order), including its oddities:
# "somebody'd" -> "somebodyd", identity entries ("let's", "she's") and the capitalised keys,
# which never match because words are lowercased first.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# A digit, a comma, a digit, anywhere: the official ``commaStrip``.
_THOUSANDS_COMMA = re.compile(r"\d,\d")
# A full stop that no digit follows (what the official ``periodStrip`` matches, see above).
_LONE_FULL_STOP = re.compile(r"\.(?!\d)")
# The official code deletes at most this many full stops (``re.UNICODE`` passed as ``count``).
_FULL_STOP_LIMIT = int(re.UNICODE)
_DELETE_ALL_MARKS = str.maketrans(dict.fromkeys(PUNCTUATION, None))


def _punctuation_table(text: str) -> dict[int, str | None]:
    """What each punctuation mark in ``text`` becomes: deleted (None) or a space."""
    if _THOUSANDS_COMMA.search(text):
        return _DELETE_ALL_MARKS
    table: dict[int, str | None] = {}
    for mark in PUNCTUATION:
        if mark in text:
            beside_space = f"{mark} " in text or f" {mark}" in text
            table[ord(mark)] = None if beside_space else " "
    return table


def _word(word: str) -> str | None:
    """One lowercased word after the number, article and contraction rules (None: dropped)."""
    word = NUMBER_WORDS.get(word, word)
    if word in ARTICLES:
        return None
    return CONTRACTIONS.get(word, word)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way the official VQA evaluation does before comparing.

    Lowercases, turns newlines and tabs into spaces, strips, deletes or spaces out the
    punctuation, deletes full stops that no digit follows, maps ``none``/``zero``..``ten`` to
    digits, drops ``a``/``an``/``the``, restores contractions and joins the words with single
    spaces (the module docstring has the exact rules).

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("1,000")
    '1000'
    >>> normalize_answer("isnt")
    "isn't"

    Raises:
        InputError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise InputError(f"a VQA answer must be a string, got {type(text).__name__}: {text!r}")
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = text.translate(_punctuation_table(text))
    text = _LONE_FULL_STOP.sub("", text, count=_FULL_STOP_LIMIT)
    words = (_word(word) for word in text.split())
    return " ".join(word for word in words if word is not None)


def _human_answers(answers: Sequence[str], where: str = "") -> list[str]:
    """The normalised answers of a non-empty list of strings, or an InputError."""
    if isinstance(answers, (bytes, bytearray)) or not isinstance(answers, Sequence):
        raise InputError(
            f"the reference answers{where} must be a string or a list of strings, "
            f"got {type(answers).__name__}: {answers!r}"
        )
    if len(answers) == 0:
        raise InputError(
            f"the list of reference answers{where} is empty: give at least one answer, "
            "or a plain string for a single reference"
        )
    for index, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise InputError(
                f"reference answer {index}{where} must be a string, got {type(answer).__name__}: {answer!r}"
            )
    return [normalize_answer(answer) for answer in answers]


def _accuracy(prediction: str, answers: str | Sequence[str], leave_one_out: bool, where: str) -> float:
    if not isinstance(prediction, str):
        raise InputError(
            f"the prediction{where} must be a string, got {type(prediction).__name__}: {prediction!r}"
        )
    predicted = normalize_answer(prediction)
    if isinstance(answers, str):
        return 1.0 if predicted == normalize_answer(answers) else 0.0
    humans = _human_answers(answers, where)
    matches = humans.count(predicted)
    if not leave_one_out:
        return min(matches / 3, 1.0)
    # Leaving out answer i leaves `matches - 1` matches among the others if answer i matched,
    # `matches` if it did not; the official code averages min(that / 3, 1) over every i.
    per_subset = [min((matches - (human == predicted)) / 3, 1.0) for human in humans]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(prediction: str, answers: str | Sequence[str], *, leave_one_out: bool = False) -> float:
    """The VQA accuracy of one predicted answer, in [0, 1].

    Both the prediction and the reference answers go through :func:`normalize_answer` first.

    Args:
        prediction: the model's answer.
        answers: either one reference answer (a string), scored by exact match: 1.0 or 0.0;
            or the human answers (a list, ten in VQAv2), scored ``min(#matches / 3, 1)``,
            so three matching humans give full credit. A one-element list therefore gives at
            most 1/3: pass a plain string for a single reference.
        leave_one_out: for a list, give the official VQA number instead: the average of
            ``min(#matches among the others / 3, 1)`` over the subsets that leave out one
            human answer each (with ten answers: 0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, 4+
            matches). The default is the paper's formula, ``min(#matches / 3, 1)`` (0, 1/3,
            2/3, 1, 1). Ignored for a single string, which is always an exact match.

    Raises:
        InputError: the prediction is not a string, or ``answers`` is neither a string nor a
            non-empty list of strings.
    """
    return _accuracy(prediction, answers, leave_one_out, "")


def score(
    predictions: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    *,
    leave_one_out: bool = False,
) -> float:
    """The mean :func:`vqa_accuracy` over paired predictions and references, in [0, 1].

    Args:
        predictions: one answer per question.
        answers: per question, one reference string or a list of human answers (see
            :func:`vqa_accuracy`).
        leave_one_out: passed to :func:`vqa_accuracy` for every question.

    Raises:
        InputError: either argument is a bare string or not a sequence, the two lengths
            differ, there are no questions, or an item is not a valid prediction/reference.
    """
    for name, value in (("predictions", predictions), ("answers", answers)):
        if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
            raise InputError(f"{name} must be a list with one item per question, got {type(value).__name__}")
    if len(predictions) != len(answers):
        raise InputError(
            f"{len(predictions)} predictions but {len(answers)} reference entries: "
            "give exactly one reference (a string or a list of answers) per prediction"
        )
    if len(predictions) == 0:
        raise InputError("no predictions to score: the VQA accuracy of zero questions is undefined")
    total = sum(
        _accuracy(prediction, refs, leave_one_out, f" of question {index}")
        for index, (prediction, refs) in enumerate(zip(predictions, answers, strict=True))
    )
    return total / len(predictions)
