"""Layer Contribution (LC): how much each layer's updates of one token type matter.

For layer i and token type τ (docs/design.md §7): run the model normally (P) and with layer i's
attention and MLP updates removed for tokens of type τ (Q); at the last prompt position
LC = KL(Q ‖ P) = Σ Q (log Q − log P), averaged over samples. The ShortV ranking is the
layer ids by ascending visual LC.

The naive algorithm runs L + 1 full passes per type. Here the counterfactual for layer i
starts from the normal pass: layers before i are identical in both runs, and in layer i
itself only the τ tokens change (the others attend to keys and values computed from
unchanged inputs), so its output is the normal output with the τ rows reset to the
layer's input. Only layers i+1.. run again, once for both types together (a batch of
two), and the last layer computes only the last position. That is L² layer evaluations
per sample instead of L(2L + 1).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from . import parallel
from .errors import ConfigError, InputError
from .methods import VANILLA
from .models.batch import Encoded, Prepared
from .models.taps import HookPoint, Taps
from .parallel import Ranks
from .questions import (
    is_question_record,
    parse_line,
    question_from_record,
    read_lines,
    resolve_images,
)
from .session import ImageLike, VisionLanguageModel
from .token_types import TokenType

SAMPLE_KEYS = frozenset({"image", "prompt"})
# Visual LC below this in every layer is rounding noise: the next-token distribution did
# not change when visual updates were removed (e.g. the prompt's answer ignores the image).
NOISE_LEVEL = 1e-10


@dataclass(frozen=True)
class Sample:
    """One calibration sample: images (paths or PIL images), a prompt, and where it came
    from (for error messages)."""

    prompt: str
    images: tuple[ImageLike, ...] = ()
    where: str = ""


@dataclass
class LCReport:
    """Per-layer LC for each measured token type, and the ranking it implies."""

    model: str
    samples: int
    visual: list[float] | None = None
    text: list[float] | None = None
    data: str | None = None
    layer_evaluations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ranking(self) -> list[int]:
        """Layer ids by ascending visual LC (ties by id): the order to freeze them in."""
        if self.visual is None:
            raise ConfigError("this LC report has no visual LC, so it implies no ranking")
        return sorted(range(len(self.visual)), key=lambda i: (self.visual[i], i))

    @property
    def visual_is_noise(self) -> bool:
        """Whether every layer's visual LC is at rounding-noise level, so the ranking it
        implies means nothing."""
        return self.visual is not None and max(abs(v) for v in self.visual) < NOISE_LEVEL

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "samples": self.samples, "data": self.data}
        if self.visual is not None:
            d["visual"] = self.visual
        if self.text is not None:
            d["text"] = self.text
        if self.visual is not None:
            d["ranking"] = self.ranking
            d["ranking_str"] = ",".join(map(str, self.ranking))
            d["visual_is_noise"] = self.visual_is_noise
        d["layer_evaluations"] = self.layer_evaluations
        return {**d, **self.extra}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> LCReport:
        try:
            d = json.loads(Path(path).read_text())
            return cls(model=d["model"], samples=d["samples"], visual=d.get("visual"),
                       text=d.get("text"), data=d.get("data"),
                       layer_evaluations=d.get("layer_evaluations", 0))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read LC report {path}: {e!r}") from None


def read_samples(path: str | os.PathLike, limit: int | None = None, *,
                 image_folder: str | os.PathLike | None = None) -> list[Sample]:
    """Samples from a JSONL file: calibration lines {"image": path or [paths], "prompt":
    text}, or the lines of an eval question file ({"question_id", "image", "text", ...},
    see `shortv.questions`), so calibration and evaluation can share data. Relative
    image paths resolve against `image_folder` (default: the file's folder). Every sample
    needs an image; a problem is an InputError naming the line."""
    path = Path(path)
    folder = Path(image_folder).expanduser() if image_folder is not None else path.parent
    if image_folder is not None and not folder.is_dir():
        raise InputError(f"--image-folder {image_folder} is not a directory")
    samples = []
    for number, line in enumerate(read_lines(path, "calibration file"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = parse_line(line, where)
        if is_question_record(record):
            question = question_from_record(record, where, folder)
            prompt, images = question.text, question.images
        else:
            prompt, images = _calibration_record(record, where, folder)
        if not images:
            raise InputError(f"{where}: the sample has no image; visual LC needs at least one")
        samples.append(Sample(prompt, images, where))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise InputError(f"{path} holds no samples; expected JSON lines like "
                         '{"image": "cat.jpg", "prompt": "Describe the image."}')
    return samples


def _calibration_record(record: dict[str, Any], where: str, folder: Path) -> tuple[str, tuple[Path, ...]]:
    if not isinstance(record.get("prompt"), str):
        raise InputError(f'{where}: expected an object with a "prompt" string (or a question '
                         'file line with "question_id" and "text")')
    unknown = sorted(set(record) - SAMPLE_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a sample "
                         'has "image" (a path or a list of paths) and "prompt"')
    return record["prompt"], resolve_images(record.get("image"), folder, where)


def encode_sample(model: VisionLanguageModel, sample: Sample) -> Encoded:
    """A sample encoded with the model's conversation template, exactly as chat does."""
    try:
        return model.encode(sample.prompt, list(sample.images))
    except InputError as e:
        raise InputError(f"{sample.where}: {e}") from None


def kl(q_logits: Tensor, p_logits: Tensor) -> Tensor:
    """KL(Q ‖ P) over the last dim, from logits (computed in float64)."""
    log_q = torch.log_softmax(q_logits.double(), dim=-1)
    log_p = torch.log_softmax(p_logits.double(), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


TYPES = {"visual": TokenType.VISUAL, "text": TokenType.TEXT}


class LCSums:
    """Per-layer LC summed over the samples measured so far in this process, for a mean
    over every sample of every rank at the end (`report`). `layer_contribution` measures
    a list of samples with it; lmms-eval's `cal_lc` measures each request batch as it comes."""

    def __init__(self, model: VisionLanguageModel, tokens: Sequence[str] = ("visual", "text")) -> None:
        self.model = model
        self.kinds = [TYPES[t] if t in TYPES else _bad_type(t) for t in tokens]
        if not self.kinds:
            raise ConfigError("tokens must name at least one of 'visual', 'text'")
        self.sums = torch.zeros(len(self.kinds), model.num_layers, dtype=torch.float64)
        self.samples = 0
        self.layer_evaluations = 0

    @torch.inference_mode()
    def add(self, encoded: Sequence[Encoded]) -> None:
        """Measure one batch of encoded samples (left-padded together) and add their LC."""
        lc, runs = _chunk_lc(self.model, self.model.prepare(list(encoded)), self.kinds)
        self.sums += lc.sum(dim=1).cpu()
        self.samples += len(encoded)
        self.layer_evaluations += runs

    def report(self, *, ranks: Ranks | None = None, data: str | None = None) -> LCReport:
        """The mean LC over the samples of every rank (a collective call under torchrun:
        every rank calls it, and every rank gets the report), under the model's name."""
        counts = torch.tensor([self.samples, self.layer_evaluations], dtype=torch.float64)
        # One reduction for sums and counts (float64 counts are exact below 2**53).
        totals = parallel.all_sum(ranks or Ranks(), torch.cat([self.sums.flatten(), counts]))
        samples, evaluations = int(totals[-2]), int(totals[-1])
        if samples == 0:
            raise InputError("no sample was measured, so there is no Layer Contribution to report")
        mean = (totals[:-2].view_as(self.sums) / samples).tolist()
        by_type = dict(zip([k.name.lower() for k in self.kinds], mean, strict=True))
        return LCReport(model=self.model.name, samples=samples, visual=by_type.get("visual"),
                        text=by_type.get("text"), data=data, layer_evaluations=evaluations)


def layer_contribution(
    model: VisionLanguageModel,
    samples: Sequence[Sample | Encoded | dict] | str | os.PathLike,
    tokens: Sequence[str] = ("visual", "text"),
    *,
    batch_size: int = 1,
    progress: bool = True,
    data: str | None = None,
    ranks: Ranks | None = None,
) -> LCReport:
    """LC of every layer for each token type in `tokens`, averaged over `samples`: a
    JSONL file (see `read_samples`), or a list of Sample objects, {"image", "prompt"}
    dicts or already encoded inputs. `batch_size` samples run together (left-padded)
    when memory allows. With `ranks` of a torchrun group, each process measures its share
    of the samples and every process gets the report of all of them."""
    if isinstance(samples, (str, os.PathLike)):
        data = data or str(samples)
        samples = read_samples(samples)
    samples = [_as_sample(s, i) for i, s in enumerate(samples, start=1)]
    sums = LCSums(model, tokens)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not samples:
        raise InputError("layer_contribution needs at least one sample")
    ranks = ranks or Ranks()
    mine = ranks.shard(samples)
    error = None
    bar = _progress(len(mine), progress and ranks.main)
    try:
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            sums.add([s if isinstance(s, Encoded) else encode_sample(model, s) for s in chunk])
            bar.update(len(chunk))
    except Exception as e:  # shared with the other ranks, so that none waits for this one
        error = e
    finally:
        bar.close()
    parallel.gather(ranks, None, error)
    report = sums.report(ranks=ranks, data=data)
    if report.visual_is_noise:
        warnings.warn(NOISE_WARNING, stacklevel=2)
    return report


NOISE_WARNING = (
    f"visual LC is below {NOISE_LEVEL:g} in every layer: removing the visual tokens' updates "
    "does not change the next token's distribution (the prompts' next token does not depend "
    "on the image), so the ranking is noise; calibrate on prompts whose answers need the image")


def _as_sample(s: Sample | Encoded | dict, number: int) -> Sample | Encoded:
    where = f"sample {number}"
    if isinstance(s, Encoded):
        if not s.images:
            raise InputError(f"{where} has no image; visual LC needs at least one")
        return s
    if isinstance(s, dict):
        unknown = sorted(set(s) - SAMPLE_KEYS)
        if unknown or not isinstance(s.get("prompt"), str):
            raise InputError(f'{where}: expected {{"image": ..., "prompt": ...}}, got keys {sorted(s)}')
        images = s.get("image")
        images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else images
        s = Sample(s["prompt"], tuple(images or ()), where)
    if not isinstance(s, Sample):
        raise InputError(f'{where} must be a Sample, an Encoded or {{"image", "prompt"}}, got {s!r}')
    if not s.images:
        raise InputError(f"{s.where or where} has no image; visual LC needs at least one")
    return s


def _bad_type(name: str) -> TokenType:
    raise ConfigError(f"unknown token type {name!r}; use 'visual' and/or 'text'")


def _chunk_lc(model: VisionLanguageModel, prepared: Prepared, kinds: list[TokenType]) -> tuple[Tensor, int]:
    """LC [types, batch, layers] for one batch, and the layer evaluations spent
    (one per layer per sequence)."""
    decoder = model.module.decoder
    x, types, positions = prepared.embeds, prepared.types, prepared.positions
    b, n_layers, k = x.shape[0], len(decoder.layers), len(kinds)
    # Every layer's input, kept at the resid_pre hook point (in sequence coordinates:
    # padding rows are zero there, which no real token attends to).
    taps = Taps(keep=frozenset((HookPoint.RESID_PRE, i) for i in range(n_layers)))
    out = decoder(x, types, positions, last_only=True, taps=taps)
    inputs = [taps.kept[HookPoint.RESID_PRE, i][0] for i in range(n_layers)]
    p_logits = decoder.head(out[:, -1])
    evaluations = b * n_layers
    lc = torch.zeros(k, b, n_layers, dtype=torch.float64, device=x.device)
    for i in range(n_layers):
        # Layer i's output with the τ rows reset to its input, for every τ at once.
        after = inputs[i + 1] if i + 1 < n_layers else out
        start = torch.cat([torch.where((types == kind)[..., None], inputs[i], after)
                           for kind in kinds])
        if i + 1 < n_layers:
            rerun = decoder(start, types.repeat(k, 1), positions.repeat(k, *[1] * (positions.dim() - 1)),
                            method=VANILLA, layers=range(i + 1, n_layers), last_only=True)
            evaluations += k * b * (n_layers - i - 1)
        else:
            rerun = start
        q_logits = decoder.head(rerun[:, -1]).view(k, b, -1)
        lc[:, :, i] = kl(q_logits, p_logits[None])
    return lc, evaluations


def _progress(total: int, enabled: bool):
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, desc="LC samples", unit="sample", disable=not enabled)


def require_matplotlib() -> None:
    """ConfigError saying how to install matplotlib, if it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'shortv[plot]' (or pip install matplotlib)"
        ) from None


def plot(report: LCReport, path: str | os.PathLike) -> None:
    """A PNG bar chart of visual and text LC per layer (needs matplotlib)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(name, values) for name, values in (("visual", report.visual), ("text", report.text))
              if values is not None]
    n_layers = len(series[0][1])
    fig, ax = plt.subplots(figsize=(max(6, n_layers * 0.3), 3.5))
    width = 0.8 / len(series)
    for j, (name, values) in enumerate(series):
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(n_layers)], values,
               width=width, label=f"{name} tokens")
    ax.set_xlabel("layer")
    ax.set_ylabel("LC = KL(Q ‖ P)")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_title(f"Layer Contribution, {report.model} ({report.samples} samples)")
    ax.set_xticks(range(n_layers))
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
