"""The lmms-eval model `shortv`: any shortv model, with any method or composition, evaluated by
lmms-eval (>= 0.7) on its tasks.

Installing shortv registers the model through lmms-eval's entry-point group
`lmms_eval.models` (pyproject.toml points it at `manifest` below), so no environment
variable or plugin path is needed:

    pip install "shortv[eval]"
    python -m lmms_eval --model shortv \
        --model_args pretrained=llava-v1.5-7b,n_frozen=19 --tasks gqa --batch_size 8

Data parallel: `accelerate launch --num_processes N -m lmms_eval ...` (or torchrun) starts
N processes; lmms-eval gives each its share of the documents (by RANK / WORLD_SIZE) and
gathers the results; each process loads its own copy of the model on the GPU of its
LOCAL_RANK. Nothing here starts a process group: lmms-eval's CLI already has one when
there are several processes, and a single process needs none.

The paper measures Layer Contribution through lmms-eval (`--tasks gqa,flickr30k_test
--limit 20 --cal_lc`); here that is the model_arg `cal_lc=PATH`, which writes the report of
`shortv lc --out PATH` measured on the prompts of the run's requests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from .. import zoo
from ..conversation import get_template
from ..errors import ConfigError, InputError, ShortVError
from ..generate import GenerationOptions, generate
from ..lc import NOISE_WARNING, LCSums
from ..loading import DTYPES, load
from ..methods import parse_layer_list
from ..methods.spec import MethodSpec, build, parse_names
from ..models.batch import Encoded
from ..models.quant import SCHEMES, Quantization
from ..parallel import Ranks, leave_at_exit
from ..paths import output_path
from ..session import VisionLanguageModel, to_pil

MODEL_ID = "shortv"

# Generation keywords that lmms-eval task files use and that change nothing here: beam
# search with one beam is greedy search, and these name features of other model families.
_NEUTRAL_GEN_KWARGS = frozenset({"num_beams", "do_sample", "image_aspect_ratio", "use_cache"})
_GEN_KWARGS = frozenset({"max_new_tokens", "temperature", "top_p", "until", "seed"}) | _NEUTRAL_GEN_KWARGS


def manifest() -> Any:
    """The entry point of the `lmms_eval.models` group: the model's registration.

    lmms-eval calls this while its model registry initialises, so the import is done here
    (registry_v2 is loaded by then) rather than at module level, where importing this
    module before lmms_eval.models would start the registry mid-import of this module."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.ShortVLMM")


class ShortVLMM(lmms):
    """lmms-eval model for shortv: LLaVA-1.5 / LLaVA-NeXT with any shortv method.

    model_args (`--model_args key=value,key=value`; lmms-eval splits them on commas):

    - pretrained: zoo name (`shortv zoo`), checkpoint directory or Hub repo id (required).
    - method: vanilla | shortv | fastv | vtw | pdrop | visionzip | dart | sparsevlm, or
      several joined by `+` (e.g. shortv+fastv). Default: shortv when n_frozen or
      frozen_layers is given, else vanilla; `method=shortv` alone freezes the card's
      paper N (as `shortv chat --method shortv`).
    - n_frozen: ShortV, freeze the first N layers of the ranking (the card's, or `ranking`).
    - frozen_layers: ShortV, exactly these layer ids, separated by ":" because a comma
      would end the argument: `frozen_layers=31:29:30` (a quoted or bracketed
      comma list, `frozen_layers=[31,29,30]`, survives lmms-eval's splitting too).
    - ranking: an LC report from `shortv lc` (or `cal_lc`), used with n_frozen.
    - k, r: FastV's layer K and dropped fraction R (default 2 and 0.5); VTW's layer K
      (default half the layers).
    - budget: the visual-token budget of the methods that keep a number of tokens
      (pdrop, visionzip, dart, sparsevlm).
    - dtype: float32 | float16 | bfloat16 | float64 (and fp32, fp16, bf16, fp64); default
      bfloat16 on CUDA, float32 on CPU. device: cpu, cuda, cuda:1, ...; default the GPU of
      this process (LOCAL_RANK) when CUDA is available, else cpu.
    - quantize: int8 | int4 | w8a8, quantization of the language model (CPU; default
      dtype then bfloat16); group_size: int4's inputs per scale (default 128).
    - conv_template: any shortv conversation template name (`shortv.get_template`, e.g.
      `vicuna_v1`, `plain`); default the model card's, the one `shortv.load` picks (not
      lmms-eval's llava default).
    - batch_size: requests per forward pass (also `--batch_size`; model_args win).
    - cal_lc: a file path; measure Layer Contribution (of the unmodified model) on the
      prompt of every request, each document's prompt once, and write there the report
      `shortv lc --out` writes for the same prompts and images, summed over all
      processes. Requests without images are skipped. The answers are still produced
      and scored.

    A bad model_arg ends the run before the model loads, with one line on stderr and a
    non-zero exit status (see `create_from_arg_string`).

    Prompts are built as `shortv chat` builds them: each request's context is the user
    turn of the conversation template, and the document's images (lmms-eval's
    doc_to_visual) get `<image>` placeholders at its start unless the context places them.
    Request types: generate_until (batched; gen_kwargs max_new_tokens, temperature, top_p,
    until, seed) and loglikelihood (multiple_choice tasks); generate_until_multi_round is
    not supported.

    loglikelihood gives lmms-eval the continuation's negative log likelihood (a loss,
    lower is likelier), which lmms-eval 0.7.3's multiple_choice scoring expects: it takes
    the argmin, as its own models return losses.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str | None = None,
        n_frozen: int | str | None = None,
        frozen_layers: str | int | Sequence[int] | None = None,
        ranking: str | None = None,
        k: int | str | None = None,
        r: float | str | None = None,
        budget: int | str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        quantize: str | None = None,
        group_size: int | str | None = None,
        conv_template: str | None = None,
        batch_size: int | str = 1,
        cal_lc: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes --max_batch_size (for "auto"): unused
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(
                f"unknown model_args {', '.join(sorted(unknown))} for --model {MODEL_ID}; use "
                "pretrained, method, n_frozen, frozen_layers, ranking, k, r, budget, dtype, device, "
                "quantize, group_size, conv_template, batch_size, cal_lc")
        if pretrained is None or not str(pretrained).strip():
            raise ConfigError(f"--model {MODEL_ID} needs model_args pretrained=NAME (a zoo name, "
                              "checkpoint directory or Hub repo id)")
        pretrained = str(pretrained)
        # Every value is checked before the (possibly long) load.
        spec = MethodSpec(
            names=_method_names(method),
            n_frozen=_integer("n_frozen", n_frozen, low=0),
            frozen_layers=_layers("frozen_layers", frozen_layers),
            ranking=None if ranking is None else str(ranking),
            k=_integer("k", k, low=0),
            r=_number("r", r, low=0.0, high=1.0),
            budget=_integer("budget", budget, low=1),
        )
        dtype = _choice("dtype", dtype, tuple(DTYPES))
        quantize = _choice("quantize", quantize, SCHEMES)
        group_size = _integer("group_size", group_size, low=2)
        try:
            Quantization.of(quantize, group_size)
        except ConfigError as e:
            raise ConfigError(f"model_args: {e}") from None
        template = None
        if conv_template is not None:
            try:
                template = get_template(str(conv_template))
            except ConfigError as e:
                raise ConfigError(f"model_args conv_template={conv_template!r}: {e}") from None
        self.batch_size_per_process = _batch_size(batch_size)
        # Checked now: the report is written after every request has run.
        try:
            self._lc_path = output_path(str(cal_lc)) if cal_lc is not None else None
        except ConfigError as e:
            raise ConfigError(f"model_args cal_lc={cal_lc}: {e}") from None
        try:
            method_kwargs = build(spec, zoo.card(pretrained))
        except ConfigError as e:
            raise ConfigError(f"model_args: {_model_args_wording(str(e))}") from None

        self._rank, self._world_size, local_rank = _process_layout()
        if self._world_size > 1:
            leave_at_exit()
        model = load(pretrained, device=_device(device, local_rank, self._world_size), dtype=dtype,
                     quantize=quantize, group_size=group_size, **method_kwargs)
        if template is not None:
            model.template = template
        self._model = model
        # Kept apart from the model: clean() drops the model after the requests, and
        # lmms-eval's collectives still ask for the device.
        self._device = model.device
        self._lc = LCSums(model) if self._lc_path is not None else None
        self._lc_seen: set[tuple] = set()
        self._lc_skipped = 0
        if self._rank == 0:
            quantized = f", {model.quantization.describe()}" if model.quantization else ""
            logger.info(f"shortv: {model.name} on {model.device} ({model.dtype}{quantized}), "
                        f"{model.method.describe()}, {self._world_size} process(es)")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ShortVLMM:
        """The model from `--model_args` plus lmms-eval's own options (batch_size,
        max_batch_size, device from its command line). The base class passes both as
        keywords, so a name in both (batch_size always comes from --batch_size, 1 by
        default) would be a TypeError; here model_args win.

        This is how lmms-eval makes the model, and a bad model_arg (or a model that cannot
        be loaded) raises BadModelArgs, which ends the process with its message and exit
        status 1: lmms-eval 0.7.3's CLI catches every Exception of an evaluation, logs it
        and exits 0, so a ShortVError here would let the run "succeed" with no results.
        A SystemExit is not an Exception and passes through. `ShortVLMM(...)` itself
        raises the ShortVError."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        try:
            return cls(**{**extra, **args})
        except ShortVError as e:
            raise BadModelArgs(f"lmms-eval --model {MODEL_ID}: {e}") from None

    # ---- what the evaluator reads ----------------------------------------------------------

    @property
    def model(self) -> VisionLanguageModel:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    # ---- requests --------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request, in request order. Requests are grouped by generation
        settings (a batch shares one GenerationOptions) and batched by prompt length."""
        answers: list[str] = [""] * len(requests)
        groups: dict[GenerationOptions, list[int]] = {}
        for i, request in enumerate(requests):
            gen_kwargs = request.args[1]
            groups.setdefault(generation_options(gen_kwargs), []).append(i)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="shortv generate_until")
        for options, indices in groups.items():
            # Longest first, so a batch holds prompts of similar length (less padding) and a
            # batch that does not fit in memory fails at once.
            indices.sort(key=lambda i: -len(str(requests[i].args[0])))
            for chunk in _chunks(indices, self.batch_size):
                images = [self._visuals(requests[i]) for i in chunk]
                try:
                    # Encoded once, for the answers and for cal_lc's measurement.
                    encoded = [self._model.encode(_context(requests[i]), im)
                               for i, im in zip(chunk, images, strict=True)]
                    self._measure_lc([requests[i] for i in chunk], images, encoded)
                    results = generate(self._model, encoded, options)
                except ShortVError as e:
                    raise type(e)(f"{_where(requests[chunk[0]])}: {e}") from None
                for i, result in zip(chunk, results, strict=True):
                    answers[i] = result.text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], result.text)
                progress.update(len(chunk))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(−log p(continuation | context), whether greedy decoding gives the continuation)
        per request, each wrapped in a GenerationResult (its `text`): the context is the
        user turn of the conversation template (with the document's images), the
        continuation is appended as text after the open assistant turn, and its tokens'
        log probabilities are summed and negated (a loss, >= 0, lower is likelier).

        Why the loss: lmms-eval 0.7.3's multiple_choice scoring takes the argmin (its own
        models return losses), so acc and acc_norm pick the likeliest choice with it;
        `continuation_scores` gives the log probabilities. Why the wrapper: its evaluator
        passes every result through `unwrap_generation_output`, which turns a plain
        (float, bool) pair into its str(); a GenerationResult's text passes unchanged.

        The whole sequence is one prefill, so FastV picks the visual tokens it keeps by
        the continuation's last token."""
        visuals = [self._visuals(request) for request in requests]
        self._measure_lc(requests, visuals)
        scored = [self._scored(request, images) for request, images in zip(requests, visuals, strict=True)]
        out: list[GenerationResult] = [GenerationResult(text=(0.0, False))] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(scored[i][0].input_ids))
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="shortv loglikelihood")
        for chunk in _chunks(order, self.batch_size):
            batch = [scored[i][0] for i in chunk]
            targets = [scored[i][1] for i in chunk]
            for i, (logprob, greedy) in zip(chunk, continuation_scores(self._model, batch, targets),
                                            strict=True):
                pair = (-logprob, greedy)
                out[i] = GenerationResult(text=pair)  # type: ignore[arg-type]
                self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], pair)
            progress.update(len(chunk))
        progress.close()
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise InputError(
            f"--model {MODEL_ID} does not support generate_until_multi_round requests "
            "(multi-round tasks); it answers generate_until and loglikelihood requests")

    # ---- Layer Contribution (model_args cal_lc) -----------------------------------------------

    def _measure_lc(self, requests: Sequence[Instance], visuals: Sequence[list[Image.Image]],
                    encoded: Sequence[Encoded] | None = None) -> None:
        """With cal_lc: add the LC of these requests' prompts (`visuals`: their documents'
        images; `encoded`: the prompts already encoded, when the caller has them) to this
        process's sums.

        A prompt is a request's context with its document's images, encoded as
        `shortv lc` encodes a sample {"image", "prompt": context} (`VisionLanguageModel.encode`, the
        conversation template and `<image>` placement of `shortv chat`), and LC is measured
        at its last position on the unmodified model, whatever method answers. Each
        document's prompt counts once: a multiple_choice document sends one loglikelihood
        request per choice with the same context, and repeats send the same request again;
        lmms-eval's padding requests (copies that even out the ranks' shares) do not count.
        Requests without images (text-only tasks, the unconditional requests of
        acc_mutual_info) have no visual LC and are skipped."""
        if self._lc is None:
            return
        given = list(encoded) if encoded is not None else [None] * len(requests)
        prompts: list[tuple[Encoded | None, str, list[Image.Image], Instance]] = []
        for request, images, done in zip(requests, visuals, given, strict=True):
            key = (request.task_name, _split(request), request.doc_id, str(request.args[0]))
            if (request.metadata or {}).get("__padding_only__") or key in self._lc_seen:
                continue
            self._lc_seen.add(key)
            if not images:
                self._lc_skipped += 1
                continue
            prompts.append((done, _context(request), images, request))
        progress = tqdm(total=len(prompts), disable=self.rank != 0 or not prompts, desc="shortv LC")
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            try:
                batch = [done if done is not None else self._model.encode(context, images)
                         for done, context, images, _ in chunk]
            except ShortVError as e:
                raise type(e)(f"{_where(chunk[0][3])}: {e}") from None
            self._lc.add(batch)
            progress.update(len(chunk))
        progress.close()

    def _write_lc_report(self) -> None:
        """Combine every process's LC sums (a collective: lmms-eval calls `clean` on every
        rank after the last request) and write the report on rank 0."""
        assert self._lc is not None and self._lc_path is not None
        ranks = Ranks(self._rank, self._world_size)
        tasks = ",".join(sorted(self.task_dict)) if self.task_dict else "?"
        try:
            report = self._lc.report(ranks=ranks, data=f"lmms-eval tasks {tasks}")
        except ShortVError as e:
            # Raising here would lose the run's scores, which are computed after clean().
            logger.error(f"shortv: cal_lc: {e} (requests without images are skipped); "
                         f"{self._lc_path} not written")
            return
        if self._rank != 0:
            return
        report.save(self._lc_path)
        if report.visual_is_noise:
            logger.warning(f"shortv: cal_lc: {NOISE_WARNING}")
        skipped = f"; {self._lc_skipped} request(s) without images skipped" if self._lc_skipped else ""
        logger.info(f"shortv: Layer Contribution over {report.samples} prompts written to "
                    f"{self._lc_path}{skipped}; ranking (ascending visual LC): "
                    f"{','.join(map(str, report.ranking))}")

    def clean(self) -> None:
        """lmms-eval's hook after the last request (before scoring): write the cal_lc
        report, then let lmms-eval free the model."""
        if self._lc is not None:
            self._write_lc_report()
            self._lc = None
        # lmms-eval drops the attributes that are nn.Modules; the loaded model is not one
        # (it holds its module), so it is dropped here.
        vars(self).pop("_model", None)
        super().clean()

    # ---- request parts ---------------------------------------------------------------------

    def _visuals(self, request: Instance) -> list[Image.Image]:
        """The document's images: lmms-eval's doc_to_visual(doc), flattened, as PIL."""
        args = request.args
        if len(args) < 6:  # ("", continuation): lmms-eval's unconditional requests
            return []
        doc_to_visual, doc_id, task, split = args[2], args[3], args[4], args[5]
        if doc_to_visual is None:
            return []
        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{_where(request)}: the document is not in the model's task_dict "
                             "(lmms-eval's evaluator fills it)") from None
        try:
            return [to_pil(v) for v in _flatten(doc_to_visual(doc))]
        except ShortVError as e:
            raise type(e)(f"{_where(request)}: {e}") from None

    def _scored(self, request: Instance, images: list[Image.Image]) -> tuple[Encoded, list[int]]:
        """The encoded context + continuation of a loglikelihood request, and the
        continuation's token ids (the end of the encoded ids)."""
        context, continuation = _context(request), request.args[1]
        if callable(continuation):  # output_type loglikelihood: the task's doc_to_target
            args = request.args
            continuation = continuation(self.task_dict[args[4]][args[5]][args[3]])
            if isinstance(continuation, str):
                continuation = _target_delimiter(request.args[1]) + continuation
        if not isinstance(continuation, str) or not continuation:
            raise InputError(f"{_where(request)}: a loglikelihood continuation must be a non-empty "
                             f"string, got {continuation!r}")
        try:
            return encode_continuation(self._model, context, continuation, images)
        except ShortVError as e:
            raise type(e)(f"{_where(request)}: {e}") from None


class BadModelArgs(SystemExit):
    """A model_arg that the model cannot run with, raised where lmms-eval makes the model.
    A SystemExit with a message: Python prints the message (one line) on stderr and exits
    with status 1, through lmms-eval's `except Exception` (see create_from_arg_string)."""


# ---- scoring ----------------------------------------------------------------------------------


def encode_continuation(model: VisionLanguageModel, context: str, continuation: str,
                        images: Sequence[Image.Image]) -> tuple[Encoded, list[int]]:
    """The templated context (as `model.chat` would send it) followed by the continuation
    text, and the continuation's ids.

    The whole text is tokenized at once and the continuation's ids are what follows the
    context's own ids: tokenizing the continuation alone would give a SentencePiece
    tokenizer's word-start form of its first piece, which is not what follows the context."""
    prompt = model.encode(context, list(images))
    text = prompt.prompt + continuation
    ids = model.require_tokenizer().encode_prompt(text)
    context_ids = prompt.input_ids.tolist()
    shared = 0
    for a, b in zip(ids, context_ids, strict=False):
        if a != b:
            break
        shared += 1
    # A merge across the boundary moves the merged piece into the continuation (scored as
    # part of it) rather than cutting a token in two.
    target = ids[shared:]
    if not target:
        raise InputError(f"the continuation {continuation!r} adds no tokens to the context")
    if any(t < 0 for t in target):
        raise InputError("a loglikelihood continuation cannot contain image placeholders")
    return Encoded(torch.tensor(ids, dtype=torch.long), prompt.images, prompt.image_sizes, text), target


@torch.inference_mode()
def continuation_scores(model: VisionLanguageModel, batch: Sequence[Encoded],
                        targets: Sequence[Sequence[int]]) -> list[tuple[float, bool]]:
    """(sum of log p(target token | everything before it), whether each target token is
    the argmax) for encoded sequences that end with their targets, in one left-padded pass."""
    hidden = model.hidden_states(model.prepare(batch))
    longest = max(len(t) for t in targets)
    # Left padding puts every sequence's end at the last position, so only the positions
    # that predict the longest target go through the vocabulary projection.
    logits = model.module.decoder.head(hidden[:, -(longest + 1):-1])
    # At least float32 for the softmax; a float64 model keeps its precision.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for row, target in zip(logprobs, targets, strict=True):
        rows = row[-len(target):]
        ids = torch.tensor(target, device=rows.device)
        value = rows.gather(-1, ids[:, None]).sum()
        greedy = bool((rows.argmax(dim=-1) == ids).all())
        out.append((float(value), greedy))
    return out


def generation_options(gen_kwargs: dict[str, Any] | None) -> GenerationOptions:
    """lmms-eval's generation kwargs as GenerationOptions: max_new_tokens, temperature,
    top_p, until (stop strings), seed; do_sample=False means greedy. Other keywords are
    logged once and ignored; beam search is refused."""
    try:
        return _generation_options(dict(gen_kwargs or {}))
    except ConfigError as e:  # a task's settings, not the model's
        raise InputError(str(e)) from None


def _generation_options(gen: dict[str, Any]) -> GenerationOptions:
    for key in sorted(set(gen) - _GEN_KWARGS):
        if key not in _IGNORED_REPORTED:
            _IGNORED_REPORTED.add(key)
            logger.warning(f"shortv: generation kwarg {key}={gen[key]!r} is not supported and is ignored")
    beams = gen.get("num_beams", 1)
    if beams not in (None, 1):
        raise InputError(f"gen_kwargs num_beams={beams!r}: shortv has no beam search; use num_beams=1")
    sample = gen.get("do_sample")
    temperature = gen.get("temperature")
    if sample is False:
        temperature = 0.0
    elif temperature is None:
        # do_sample=True alone samples at temperature 1, as transformers does.
        temperature = 1.0 if sample else 0.0
    temperature = _number("temperature", temperature, low=0.0, what="gen_kwargs")
    top_p = gen.get("top_p")
    if temperature == 0 or top_p is None:
        top_p = None  # greedy ignores it; task files write top_p: 0 next to temperature: 0
    else:
        top_p = _number("top_p", top_p, low=0.0, high=1.0, what="gen_kwargs")
    until = gen.get("until")
    stop = () if until is None else (until,) if isinstance(until, str) else until
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InputError(f"gen_kwargs until must be a string or a list of strings, got {until!r}")
    max_new_tokens = gen.get("max_new_tokens")
    settings: dict[str, Any] = {"temperature": temperature, "top_p": top_p,
                                "stop": tuple(s for s in stop if s)}
    if max_new_tokens is not None:
        settings["max_new_tokens"] = _integer("max_new_tokens", max_new_tokens, low=0, what="gen_kwargs")
    if gen.get("seed") is not None:
        settings["seed"] = _integer("seed", gen["seed"], what="gen_kwargs")
    return GenerationOptions(**settings)


_IGNORED_REPORTED: set[str] = set()


# ---- model_args -------------------------------------------------------------------------------


def _integer(name: str, value: Any, *, low: int | None = None, what: str = "model_args") -> int | None:
    """An integer model arg: lmms-eval gives ints for digit strings, else strings (or
    floats for "4.0", kept when whole)."""
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        number = int(value)
    if number is None:
        raise ConfigError(f"{what} {name}={value!r} is not an integer")
    if low is not None and number < low:
        raise ConfigError(f"{what} {name}={number} must be >= {low}")
    return number


def _number(name: str, value: Any, *, low: float, high: float | None = None,
            what: str = "model_args") -> float | None:
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number != number:  # NaN
        raise ConfigError(f"{what} {name}={value!r} is not a number")
    if number < low or (high is not None and number > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{what} {name}={number} must be {bounds}")
    return number


def _method_names(value: Any) -> tuple[str, ...] | None:
    """model_args method=NAME or NAME+NAME (e.g. shortv+fastv)."""
    if value is None:
        return None
    try:
        return parse_names(str(value))
    except ConfigError as e:
        raise ConfigError(f"model_args method={value!r}: {e}") from None


def _choice(name: str, value: Any, choices: Sequence[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"model_args {name}={value!r}: use one of {', '.join(choices)}")
    return value


def _layers(name: str, value: Any) -> tuple[int, ...] | None:
    """Layer ids from "31:29:30" (lmms-eval splits model_args on commas), a quoted or
    bracketed comma list, one id (an int after lmms-eval's parsing), or a Python list."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or (isinstance(value, int) and not isinstance(value, bool)):
        value = ",".join(map(str, value if isinstance(value, (list, tuple)) else [value]))
    try:
        if not isinstance(value, str):
            raise ConfigError("not text")
        ids = parse_layer_list(value.strip().strip("'\"[]()").replace(":", ","))
    except ConfigError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise ConfigError(f"model_args {name}={value!r} is not a list of layer ids; separate them "
                          f"with ':' (e.g. {name}=31:29:30)")
    return tuple(ids)


def _batch_size(value: Any) -> int:
    if isinstance(value, str) and value.strip().startswith("auto"):
        raise ConfigError(f"batch_size={value!r}: automatic batch sizes are not supported; give a number")
    size = _integer("batch_size", value, low=1)
    assert size is not None
    return size


# The CLI's method errors name its flags; here the same rules are about model_args.
_FLAG_NAMES = (("--method ", "method="), ("--n-frozen N", "n_frozen=N"), ("--n-frozen", "n_frozen"),
               ("--frozen-layers I,J,...", "frozen_layers=I:J:..."), ("--frozen-layers", "frozen_layers"),
               ("--ranking", "ranking"), ("--k", "k"), ("--r", "r"))


def _model_args_wording(message: str) -> str:
    for flag, arg in _FLAG_NAMES:
        message = message.replace(flag, arg)
    return message


# ---- processes and devices --------------------------------------------------------------------


def _process_layout() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process: torch.distributed's when a process
    group exists (lmms-eval's CLI makes one under accelerate launch / torchrun), else the
    launcher's environment, else a single process."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local


def _device(device: Any, local_rank: int, world_size: int) -> str | None:
    """The device this process loads onto. With several processes every process takes the
    GPU of its LOCAL_RANK, as lmms-eval's own models do, also when the command line names
    one GPU (`--device cuda:0` in a data-parallel run means "the GPUs", not one of them)."""
    if device is not None and not isinstance(device, str):
        raise ConfigError(f"model_args device={device!r}: use e.g. cpu, cuda or cuda:1")
    on_cuda = device is None or device.startswith("cuda")
    if world_size <= 1 or not torch.cuda.is_available() or not on_cuda:
        return device
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"process LOCAL_RANK={local_rank} has no GPU of its own: only "
                          f"{torch.cuda.device_count()} visible; start fewer processes")
    own = f"cuda:{local_rank}"
    if device not in (None, "cuda", own):
        logger.warning(f"shortv: device={device} replaced by {own}, this process's GPU "
                       f"({world_size} processes)")
    torch.cuda.set_device(local_rank)  # collectives (NCCL) run on the current device
    return own


# ---- helpers ----------------------------------------------------------------------------------


def _context(request: Instance) -> str:
    context = request.args[0]
    if isinstance(context, list) and len(context) == 1:
        context = context[0]
    if not isinstance(context, str):
        raise InputError(f"{_where(request)}: the context must be a string, got {type(context).__name__}")
    return context


def _flatten(visuals: Any) -> Iterator[Any]:
    """doc_to_visual's result: None, one image, or a (possibly nested) list of them."""
    if visuals is None:
        return
    if isinstance(visuals, (list, tuple)):
        for v in visuals:
            yield from _flatten(v)
        return
    if isinstance(visuals, dict):
        raise InputError("doc_to_visual gave audio or another non-image input; shortv takes images")
    yield visuals


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _target_delimiter(doc_to_target: Any) -> str:
    """What goes between the context and the target of an output_type loglikelihood
    request: its task's target_delimiter (" " by default). lmms-eval 0.7.3 puts it before
    each choice of multiple_choice requests itself, but passes the bare doc_to_target for
    loglikelihood requests (lm-eval, where this comes from, adds it there too)."""
    config = getattr(getattr(doc_to_target, "__self__", None), "config", None)
    delimiter = getattr(config, "target_delimiter", None)
    return delimiter if isinstance(delimiter, str) else ""


def _split(request: Instance) -> Any:
    """The request's dataset split (None for lmms-eval's unconditional requests)."""
    return request.args[5] if len(request.args) >= 6 else None


def _where(request: Instance) -> str:
    return f"task {request.task_name} doc {request.doc_id}"


__all__ = ["BadModelArgs", "ShortVLMM", "continuation_scores", "encode_continuation", "generation_options",
           "manifest"]
