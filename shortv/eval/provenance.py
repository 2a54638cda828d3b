"""What produced an eval result: the record each answer line and the summary carry, and
the comparison that lets a rerun resume an answer file only if it would write the same
answers.

The record (a JSON object):

    {"model": "llava-v1.5-7b",                      the name loaded (zoo name, path or repo id)
     "method": {"name": "fastv", "k": 2, "r": 0.5,  every field of the method's dataclass,
                "description": "fastv(k=2, r=0.5)"}, composed methods as "parts"
     "template": "vicuna_v1",
     "generation": {"max_new_tokens": 128, "temperature": 0.0, "top_p": null,
                    "seed": null, "stop": []},
     "dtype": "bfloat16",
     "quantization": {"quantization": "int4",       only for a quantized model (`shortv.load(
                      "group_size": "128"},          quantize=...)`); absent means dense
     "version": "0.1.0"}                             shortv's

Every field is compared on resume: each can change the answers (dtype too: bfloat16 and
float32 greedy answers differ on real models, and a shortv release may change them).
Not recorded, so not compared: the batch size, the device, --compile and the number of
torchrun processes. They change the order of floating-point operations only, never the
computation (left-padded batches are masked out exactly, and `shortv eval` writes the same
bytes for any batch size on the demo), and resuming with a larger batch or on another GPU
is what resuming is for.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from ..generate import GenerationOptions
from ..methods import Method
from ..models.quant import Quantization
from ..version import __version__

# Compared in this order; the first that differs is the one an error names.
FIELDS = ("model", "method", "template", "generation", "dtype", "quantization", "version")
# Fields a record leaves out for their usual value (so that older records still compare):
# a dense model has no quantization.
OPTIONAL = frozenset({"quantization"})


def method_record(method: Method) -> dict[str, Any]:
    """A method as plain JSON: its name and every dataclass field (a composition's
    parts each as such a record)."""
    record: dict[str, Any] = {"name": method.name}
    for f in dataclasses.fields(method):
        record[f.name] = _plain(getattr(method, f.name))
    return record


def _plain(value: Any) -> Any:
    if isinstance(value, Method):
        return method_record(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 → "float32"."""
    return str(dtype).removeprefix("torch.")


def build(
    *,
    model: str | None = None,
    method: Method | None = None,
    template: str | None = None,
    options: GenerationOptions | None = None,
    dtype: torch.dtype | None = None,
    quantization: Quantization | None = None,
) -> dict[str, Any]:
    """The record of a run (the version is always known). A field left None is left out:
    what a command knows before loading the model, checked early and again in full
    after loading."""
    record: dict[str, Any] = {}
    if model is not None:
        record["model"] = model
    if method is not None:
        record["method"] = {**method_record(method), "description": method.describe()}
    if template is not None:
        record["template"] = template
    if options is not None:
        record["generation"] = {f.name: _plain(getattr(options, f.name))
                                for f in dataclasses.fields(options)}
    if dtype is not None:
        record["dtype"] = dtype_name(dtype)
    if quantization is not None:
        record["quantization"] = quantization.metadata()
    record["version"] = __version__
    # As it reads back from a file (tuples become lists), so that records compare equal.
    return json.loads(json.dumps(record))


def of_model(model: Any, options: GenerationOptions) -> dict[str, Any]:
    """The full record of a run of a loaded LLaVA with these generation options."""
    return build(model=model.name, method=model.method, template=model.template.name,
                 options=options, dtype=model.dtype, quantization=model.quantization)


def difference(recorded: Any, expected: dict[str, Any]) -> str | None:
    """The first field of `expected` that `recorded` (a record read from a file) does not
    match, said as "field=RECORDED, this run has field=EXPECTED"; None if all match."""
    if not isinstance(recorded, dict):
        return "no record of its run"
    for name in FIELDS:
        if name in OPTIONAL:
            old, new = recorded.get(name), expected.get(name)
            if old != new:
                return (f"{name}={_show(name, old or 'none')}, "
                        f"this run has {name}={_show(name, new or 'none')}")
            continue
        if name not in expected or recorded.get(name) == expected[name]:
            continue
        if name not in recorded:
            return f"no {name} recorded, this run has {name}={_show(name, expected[name])}"
        if name == "method":
            # Methods are named by their description; when the descriptions agree (a field
            # the description leaves out), by the field, as any other field.
            old = recorded["method"]
            old_text = old.get("description") if isinstance(old, dict) else None
            if old_text != expected["method"].get("description"):
                return (f"method={old_text or json.dumps(old)}, "
                        f"this run has method={expected['method'].get('description')}")
        path, old, new = _first_leaf_difference(name, recorded[name], expected[name])
        return f"{path}={_show(path, old)}, this run has {path}={_show(path, new)}"
    return None


def _first_leaf_difference(path: str, old: Any, new: Any) -> tuple[str, Any, Any]:
    """The dotted path of the first value that differs, and both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*new, *(k for k in old if k not in new)]:
            if old.get(k, _MISSING) != new.get(k, _MISSING):
                return _first_leaf_difference(f"{path}.{k}", old.get(k, _MISSING), new.get(k, _MISSING))
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                return _first_leaf_difference(f"{path}[{i}]", a, b)
    return path, old, new


_MISSING = object()  # a field one record has and the other has not


def _show(path: str, value: Any) -> str:
    """A value as an error message shows it: names bare, anything else (a stop string
    too) as JSON."""
    if value is _MISSING:
        return "(none)"
    if isinstance(value, str) and not path.startswith("generation"):
        return value
    return json.dumps(value)
