"""`shortv.load`: from a zoo name, a directory or a Hub repo id to a ready model (a
`shortv.session.VisionLanguageModel`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import families, quantized_checkpoint, store, zoo
from .checkpoint import Filler, checkpoint_shapes, tie, weight_files
from .conversation import get_template
from .errors import ConfigError, ShortVError, require_model_name
from .family import Checkpoint, Family, read_config
from .methods import Method
from .models.quant import Quantization, quantize_module
from .ops import Linear
from .ranking import RankingLike, choose_method
from .session import VisionLanguageModel

Model = TypeVar("Model", bound=nn.Module)


def load(
    source: str | Path,
    *,
    n_frozen: int | None = None,
    frozen_layers: Sequence[int] | None = None,
    ranking: RankingLike | None = None,
    method: Method | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    template: str | None = None,
    quantize: str | Quantization | None = None,
    group_size: int | None = None,
) -> VisionLanguageModel:
    """Load a model: LLaVA-1.5 / LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL.

    source: a zoo name (`shortv zoo`), a local checkpoint directory, or a Hub repo id.
    n_frozen: freeze visual tokens in the first N layers of the ranking (the card's, or
        `ranking`: an LC report file or a list of layer ids); frozen_layers: exact ids.
    method: any shortv method (Vanilla, ShortV, FastV, VTW, PDrop, VisionZip, DART, SparseVLM,
        or `shortv.compose(...)`); with n_frozen / frozen_layers it is composed with that ShortV.
    device: default "cuda" when available, else "cpu"; dtype: default bfloat16 on CUDA,
        float32 on CPU. Weights are cast to dtype while loading.
    template: the conversation template's name (`shortv.conversation.TEMPLATES`); default
        the zoo card's, else the model family's (`vicuna_v1` for LLaVA: LLaVA-1.5's
        training and evaluation template).
    quantize: "int8", "int4" or "w8a8": the language model's Linear layers keep their
        weights quantized (int8 per output channel; int4 in groups of `group_size` inputs,
        default 128; w8a8: int8's weights, and activations rounded to int8 per row),
        quantized while the checkpoint is read; the embeddings, norms, vision tower and
        projector stay in dtype, which defaults to bfloat16. CPU only (docs/quantization.md).
    """
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"source must be a zoo name, a directory or a repo id, got {source!r}")
    require_model_name(source)
    source = str(source)
    card = zoo.card(source)
    if template is None and card is not None:
        template = card.template
    # A bad name fails before the weights are looked for; without one, the model keeps
    # its family's default template, which load_directory sets.
    conversation = get_template(template) if template is not None else None

    def chosen(num_layers: int) -> Method:
        return choose_method(
            num_layers, n_frozen=n_frozen, frozen_layers=frozen_layers, ranking=ranking,
            method=method, default_ranking=card.ranking if card is not None else (),
            model_name=card.name if card is not None else source,
        )

    # A zoo card knows the depth: a method that cannot work is refused before the weights
    # are looked for (or downloaded).
    fitted = chosen(card.config.text.layers) if card is not None else None
    quantization = Quantization.of(quantize, group_size)
    if quantization is not None:
        # Checked before the weights are looked for (or downloaded); the default device of a
        # quantized model is the CPU, GPU or not.
        device = "cpu" if device is None else device
        _require_cpu(resolve_device(device), f"quantize={quantization.scheme!r}")
    model = load_directory(store.locate(source), device=device, dtype=dtype,
                           family=card.family if card is not None else None, quantize=quantization)
    model.name = card.name if card is not None else source
    if conversation is not None:
        model.template = conversation
    model.set_method(fitted if fitted is not None else chosen(model.num_layers))
    return model


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


# Names accepted for dtypes (the CLI's --dtype choices too).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, *, quantized: bool = False
                  ) -> torch.dtype:
    """The dtype asked for, or the default: bfloat16 on CUDA and for a quantized model
    (torch's weight-only CPU kernels are fast in bfloat16 only), else float32."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" or quantized else torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a floating-point type")
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_directory(
    directory: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | None = None,
    quantize: Quantization | None = None,
) -> VisionLanguageModel:
    """Build a model from a checkpoint directory of any registered family, in any layout
    its family reads (docs/design.md §4). The family comes from config.json's model_type.

    family: the family the caller expects (a zoo card's); a checkpoint of another family
        is refused with a ConfigError before its weights are read.
    quantize: quantize the language model's Linear layers while loading (`shortv.load`).
    """
    directory = Path(directory)
    if quantized_checkpoint.is_quantized(directory):
        return _load_quantized(directory, resolve_device("cpu" if device is None else device), dtype, family,
                               quantize)
    target = resolve_device("cpu" if device is None and quantize is not None else device)
    if quantize is not None:
        _require_cpu(target, f"quantize={quantize.scheme!r}")
    target_dtype = resolve_dtype(dtype, target, quantized=quantize is not None)
    raw = read_config(directory)
    files = weight_files(directory)
    shapes = checkpoint_shapes(files)
    found = _family(directory, raw, family)
    checkpoint = found.read_checkpoint(directory, raw, shapes, _locate)
    module = build_empty(checkpoint.config, found.build)
    load_into = _quantize_language_model(module, quantize, checkpoint) if quantize is not None else {}
    _fill(module, checkpoint, files, directory, target, target_dtype, load_into)
    tokenizer, missing = _tokenizer(found, directory)
    return found.session(module, tokenizer=tokenizer, template=get_template(found.default_template),
                         name=directory.name, checkpoint_dir=directory, missing_tokenizer=missing)


def _require_cpu(device: torch.device, what: str) -> None:
    if device.type != "cpu":
        raise ConfigError(f"{what} runs on the CPU only (torch's quantized kernels used here are its CPU "
                          f"ones), not on {device.type}; load with device='cpu' or without quantize")


def saved_precision(source: str | Path) -> tuple[Quantization, torch.dtype] | None:
    """The scheme and dtype of a quantized checkpoint directory (`save_quantized`), or None
    for anything else (a dense checkpoint, a zoo name, a repo id)."""
    directory = Path(source)
    if directory.is_dir() and quantized_checkpoint.is_quantized(directory):
        return quantized_checkpoint.saved_quantization(directory)
    return None


def _family(directory: Path, raw: dict[str, Any], expected: str | None) -> Family:
    """The family of a config.json, or ConfigError when it is not the `expected` one."""
    found = families.of_config_json(raw, f"{directory}/config.json")
    if expected is not None and found.name != expected:
        raise ConfigError(
            f"{directory}/config.json describes a {found.title} model (model_type "
            f"{raw.get('model_type')!r}, family {found.name!r}), but its zoo card says family "
            f"{expected!r}; fix the card's family or point it at the right weights")
    return found


def _load_quantized(directory: Path, target: torch.device, dtype: str | torch.dtype | None,
                    family: str | None, quantize: Quantization | None) -> VisionLanguageModel:
    """A quantized checkpoint (`VisionLanguageModel.save_quantized`): built with its saved
    scheme, filled from its one file; `quantize`, when given, must be that scheme."""
    saved, saved_dtype = quantized_checkpoint.saved_quantization(directory)
    if quantize is not None and quantize != saved:
        raise ConfigError(f"{directory} is a quantized checkpoint, {saved.describe()}; load it with quantize="
                          f"{saved.scheme!r}" + (f", group_size={saved.group_size}" if saved.scheme == "int4"
                                                   else "") + " or without quantize")
    _require_cpu(target, f"{directory}, a quantized checkpoint,")
    raw = read_config(directory)
    found = _family(directory, raw, family)
    checkpoint = found.read_checkpoint(directory, raw, None, _locate)
    module = build_empty(checkpoint.config, found.build)
    _quantize_language_model(module, saved, checkpoint)
    target_dtype = saved_dtype if dtype is None else resolve_dtype(dtype, target, quantized=True)
    quantized_checkpoint.fill(module, directory, target_dtype, checkpoint.tied, checkpoint.skip)
    tokenizer, missing = _tokenizer(found, directory)
    return found.session(module, tokenizer=tokenizer, template=get_template(found.default_template),
                         name=directory.name, checkpoint_dir=directory, missing_tokenizer=missing)


def _quantize_language_model(module: nn.Module, quantization: Quantization,
                             checkpoint: Checkpoint) -> dict[str, Any]:
    """Swap the language model's Linear layers (all but an output head tied to the
    embeddings) for quantized ones; {weight name: the layer's `load_weight`}."""
    tied = {name for name, _ in checkpoint.tied}
    names = [f"decoder.{name}" for name, m in module.decoder.named_modules() if isinstance(m, Linear)]
    names = [name for name in names if f"{name}.weight" not in tied]
    layers = quantize_module(module, quantization, names)
    return {f"{name}.weight": layer.load_weight for name, layer in zip(names, layers, strict=True)}


def _fill(model: nn.Module, checkpoint: Checkpoint, files: list[Path], directory: Path,
          device: torch.device, dtype: torch.dtype, load_into: dict[str, Any] | None = None) -> None:
    """Fill the model's parameters from the directory's own files and the checkpoint's
    extra sources; tied parameters are not loaded but share the one they are tied to;
    `load_into`: parameters a quantized layer takes (`Filler.load_into`)."""
    filler = Filler(model, device, dtype, ignore=checkpoint.skip, load_into=load_into or {})
    for name, _ in checkpoint.tied:
        filler.params.pop(name, None)
    filler.fill_from(files, checkpoint.key_map)
    for source in checkpoint.extra:
        filler.fill_from(list(source.files), source.key_map)
    filler.finish(" + ".join([str(directory), *(source.label for source in checkpoint.extra)]))
    tie(model, checkpoint.tied)


def _tokenizer(family: Family, directory: Path) -> tuple[Any, str]:
    """The directory's tokenizer, or None and why there is none."""
    if any((directory / name).is_file() for name in family.tokenizer_files):
        return family.load_tokenizer(directory), ""
    # The model still runs on token ids; text needs a tokenizer, so say which file is
    # missing now and again (via encode) at the first call that needs it.
    missing = (f"{directory} has no {' or '.join(family.tokenizer_files)}; copy the tokenizer "
               "files of the model's original repository into it")
    warnings.warn(f"loaded without a tokenizer: {missing}", stacklevel=4)
    return None, missing


def _locate(name: str, near: Path) -> Path:
    """Where a checkpoint named by the one in `near` is (a family's `Locate`)."""
    return store.locate(name, relative_to=near)


class _SkipRandomInit(TorchFunctionMode):
    """Skips the in-place random initialisers modules run in their constructors."""

    SKIPPED = frozenset({"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SKIPPED:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


@contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the meta device (no memory, no values) without running their
    random initialisers: the values come from a checkpoint anyway, and the first random
    op on the meta device imports ~900 Python modules (~150 MB, seconds) for nothing."""
    with torch.device("meta"), _SkipRandomInit():
        yield


def build_empty(config: Any, build: Callable[[Any], Model]) -> Model:
    """The model `build(config)` makes (a family's `build`), its modules on the meta
    device, ready to be filled from a checkpoint."""
    with meta_device():
        return build(config)


def config_of_directory(directory: str | Path) -> Any:
    """A checkpoint directory's config (its family's config type: LlavaConfig for LLaVA,
    QwenVLConfig for Qwen2-VL), without reading its weights."""
    directory = Path(directory)
    raw = read_config(directory)
    family = families.of_config_json(raw, f"{directory}/config.json")
    return family.read_checkpoint(directory, raw, None, _locate).config


__all__ = ["ShortVError", "load", "load_directory"]
