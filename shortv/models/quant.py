"""Weight-only quantization of the language model's Linear layers: int8 and int4.

`QuantizedLinear` replaces an `ops.Linear`: its weight is stored quantized and the
activations stay in the model's dtype (bfloat16 by default on a quantized CPU model).

- int8: one scale per output channel, symmetric: w ≈ q · s, q in [-127, 127] (int8).
- int4: one scale and one offset per group of `group_size` inputs of an output channel
  (asymmetric, min/max): w ≈ (q - 8) · s + z, q in [0, 15], two per byte.

A layer computes a few rows (a decode step, a few sequences) with torch's weight-only
kernels, which read the quantized weight once (`torch._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`); more rows (a prefill) dequantize the weight into a
transient dense one and run one GEMM, which is several times faster there than the
kernels (BENCHMARKS.md). `KERNEL_MAX_ROWS` is the switch.

Weights are quantized as they are read (`QuantizedLinear.load_weight`, called by the
checkpoint filler tensor by tensor), so the dense model never exists in memory. The
kernels are torch's CPU ones: quantization is refused on other devices.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import Linear
from .config import TextConfig

SCHEMES = ("int8", "int4", "w8a8")
# The schemes whose weights are int8 per output channel (w8a8 also rounds its activations).
INT8_WEIGHTS = frozenset({"int8", "w8a8"})
DEFAULT_GROUP_SIZE = 128
# The group sizes torch's int4 CPU kernel takes.
GROUP_SIZES = (32, 64, 128, 256)
# Above this many rows a layer dequantizes and runs one dense GEMM (see the docstring):
# where the two cost the same for a 4096 x 11008 weight on the CPU (BENCHMARKS.md).
KERNEL_MAX_ROWS = {"int8": 16, "int4": 96}
# int4 weights are packed as torch's CPU kernel reads them: blocks of 64 output channels,
# [blocks, in, 32] bytes, the low nibble channel i of the block and the high one 32 + i
# (`_pack_int4`, checked against torch's own packing once per process). Other channel
# counts are padded up to a multiple of 64.
_INT4_BLOCK = 64
# Rows quantized at a time while loading (a multiple of the int4 packing's 64-row blocks):
# bounds the transient float32 copy of a weight to a few tens of MB.
_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Quantization:
    """A scheme: "int8" (weights per output channel), "int4" (weights per group of
    `group_size` inputs; ignored by the others) or "w8a8" (int8's weights, and each
    row of activations rounded to int8 on the fly, for an int8 x int8 matmul)."""

    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown quantization {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if type(self.group_size) is not int or self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))} (what torch's "
                              f"int4 kernel takes), got {self.group_size!r}")

    @classmethod
    def of(cls, quantize: str | Quantization | None, group_size: int | None = None) -> Quantization | None:
        """A Quantization from `quantize` ("int8", "int4", a Quantization or None) and an
        optional group size (int4)."""
        if quantize is None:
            if group_size is not None:
                raise ConfigError("a group size needs quantize='int4'")
            return None
        if isinstance(quantize, Quantization):
            return quantize if group_size is None else cls(quantize.scheme, group_size)
        if not isinstance(quantize, str):
            raise ConfigError(f"quantize must be one of {', '.join(SCHEMES)} or None, got {quantize!r}")
        if group_size is not None and quantize != "int4":
            raise ConfigError(f"a group size applies to int4 only, not to {quantize}; leave it out")
        return cls(quantize, DEFAULT_GROUP_SIZE if group_size is None else group_size)

    def describe(self) -> str:
        return {"int8": "int8 (per channel)", "int4": f"int4 (groups of {self.group_size})",
                "w8a8": "w8a8 (int8 weights per channel, int8 activations per row)"}[self.scheme]

    def check_width(self, in_features: int, where: str) -> None:
        """ConfigError when int4's groups do not divide a layer's input width."""
        if self.scheme == "int4" and in_features % self.group_size:
            raise ConfigError(f"int4 group size {self.group_size} does not divide the input width "
                              f"{in_features} of {where}; choose a group size that divides it")

    def metadata(self) -> dict[str, str]:
        """How a quantized checkpoint records the scheme (safetensors metadata)."""
        meta = {"quantization": self.scheme}
        if self.scheme == "int4":
            meta["group_size"] = str(self.group_size)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Quantization:
        return cls(meta["quantization"], int(meta.get("group_size", DEFAULT_GROUP_SIZE)))


class QuantizedLinear(nn.Module):
    """A Linear layer with a quantized weight (module docstring). Built with placeholder
    parameters on the meta device that loading replaces (`load_weight` for the weight), or
    from a loaded layer (`from_linear`). forward(x, contiguous=...) as `ops.Linear`'s."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quantization: Quantization,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantization = quantization
        # Placeholders with the dense shapes, on the meta device (no memory), for the
        # checkpoint filler to match; the filler replaces the bias, `load_weight` the weight.
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device="meta"), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta"), requires_grad=False)
                     if bias else None)
        # int8: qweight [out, in] int8, scales [out]; int4: qweight [out_padded, in / 2]
        # uint8, scales [in / group, out_padded, 2] (scale, offset); both in the state dict.
        self.register_buffer("qweight", None)
        self.register_buffer("scales", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantization: Quantization) -> QuantizedLinear:
        """A quantized copy of a loaded Linear, in its dtype and on its device."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, quantization,
                dtype=linear.weight.dtype)
        q.weight = None
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        q.load_weight(linear.weight.detach(), linear.weight.dtype, linear.weight.device)
        return q

    def load_weight(self, weight: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        """Quantize a dense weight [out, in] (any float dtype; a view of a checkpoint file is
        fine) into this layer, whose activations and scales are in `dtype`."""
        if device.type != "cpu":
            raise ConfigError(f"quantize runs on the CPU only (torch's kernels used here are its CPU ones); "
                              f"load with device='cpu', or without quantize on {device.type}")
        quant = self.quantization
        if quant.scheme in INT8_WEIGHTS:
            self.set_quantized(*_quantize_int8(weight, dtype))
        else:
            self.set_quantized(*_quantize_int4(weight, quant.group_size, dtype))

    def set_quantized(self, qweight: Tensor, scales: Tensor) -> None:
        """Take stored quantized values and scales (a quantized checkpoint's; shapes as
        `stored_shapes` says)."""
        if self.quantization.scheme == "int4":
            _check_int4_packing()
        if self.quantization.scheme == "w8a8":
            _check_int_mm()
        self.qweight, self.scales = qweight, scales
        self._parameters.pop("weight", None)
        self.weight = None

    def stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of `qweight` and `scales`."""
        out, width = self.out_features, self.in_features
        if self.quantization.scheme in INT8_WEIGHTS:
            return {"qweight": (out, width), "scales": (out,)}
        padded = -(-out // _INT4_BLOCK) * _INT4_BLOCK
        return {"qweight": (padded, width // 2), "scales": (width // self.quantization.group_size, padded, 2)}

    def dequantized(self) -> Tensor:
        """The dense weight [out, in] this layer computes with, in its dtype (a new tensor)."""
        assert self.qweight is not None and self.scales is not None
        if self.quantization.scheme in INT8_WEIGHTS:
            return self.qweight.to(self.scales.dtype) * self.scales[:, None]
        out = torch.empty(self.qweight.shape[0], self.in_features, dtype=self.scales.dtype)
        group = self.quantization.group_size
        return _dequantize_int4(self.qweight, self.scales, group, out)[: self.out_features]

    def forward(self, x: Tensor, *, contiguous: bool = False) -> Tensor:
        assert self.qweight is not None and self.scales is not None, "weight not loaded"
        flat = x.reshape(-1, self.in_features)
        scheme = self.quantization.scheme
        if flat.dtype != self.scales.dtype:
            flat = flat.to(self.scales.dtype)
        if scheme == "w8a8":
            y = _w8a8(flat, self.qweight, self.scales)
        elif flat.shape[0] <= KERNEL_MAX_ROWS[scheme]:
            if scheme == "int8":
                y = torch._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    flat.contiguous(), self.qweight, self.quantization.group_size, self.scales)
                y = y[:, : self.out_features]
        else:
            with _workspace(self.qweight.shape[0] * self.in_features, self.scales.dtype) as weight:
                weight = weight.view(self.qweight.shape[0], self.in_features)
                if scheme == "int8" and flat.dtype != torch.float16:
                    # The per-channel scale factors out of the product: scale the output rows.
                    y = F.linear(flat, weight.copy_(self.qweight)).mul_(self.scales)
                elif scheme == "int8":  # float16 would overflow on the unscaled product
                    y = F.linear(flat, weight.copy_(self.qweight).mul_(self.scales[:, None]))
                else:
                    weight = _dequantize_int4(self.qweight, self.scales, self.quantization.group_size, weight)
                    y = F.linear(flat, weight[: self.out_features])
        if self.bias is not None:
            y = y + self.bias
        y = y.contiguous() if contiguous else y
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.quantization.describe()}")



def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of x [R, K] as int8 values and a float32 scale [R, 1]: x ≈ q · s with
    s = max|row| / 127 (w8a8's activations)."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / 127).clamp_(min=1e-12)
    rounded = torch.div(x.float(), scale).round_().clamp_(-127, 127)  # a new tensor: x stays
    return rounded.to(torch.int8), scale


def _w8a8(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [R, K] @ (qweight · scales)ᵀ with x's rows rounded to int8: one int8 x int8 -> int32
    matmul (`torch._int_mm`), then both scales (in place: the product is the big tensor)."""
    q, row_scale = quantize_rows(x)
    acc = torch._int_mm(q, qweight.t())
    return acc.float().mul_(row_scale).mul_(scales).to(x.dtype)


@functools.cache  # once per process (a failure raises, so it is asked again)
def _check_int_mm() -> None:
    """This torch has an int8 matmul on the CPU (w8a8 needs it)."""
    try:
        torch._int_mm(torch.ones(1, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except (RuntimeError, AttributeError) as e:
        raise ConfigError(f"w8a8 needs torch._int_mm on the CPU, which this torch ({torch.__version__}) "
                          f"lacks ({e}); use int8") from None


def _rows(weight: Tensor, step: int = _CHUNK_ROWS) -> Iterator[tuple[int, Tensor]]:
    """(first row, rows as float32) of a weight, a chunk at a time."""
    for start in range(0, weight.shape[0], step):
        yield start, weight[start: start + step].float()


def _quantize_int8(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    out, width = weight.shape
    q = torch.empty(out, width, dtype=torch.int8)
    scales = torch.empty(out, dtype=dtype)
    for start, w in _rows(weight):
        # The scale as the kernel will use it (rounded to dtype), so that q is exact for it.
        s = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(dtype)
        scales[start: start + w.shape[0]] = s
        q[start: start + w.shape[0]] = (w / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def _quantize_int4(weight: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _check_int4_packing()
    out, width = weight.shape
    padded = -(-out // _INT4_BLOCK) * _INT4_BLOCK
    groups = width // group
    packed = torch.empty(padded, width // 2, dtype=torch.uint8)
    params = torch.zeros(groups, padded, 2, dtype=dtype)
    params[:, out:, 0] = 1  # padding channels: scale 1, offset 0, values 8: weight 0
    packed[out:] = 0x88
    for start, w in _rows(weight):
        rows = w.shape[0]
        g = w.view(rows, groups, group)
        low, high = g.amin(dim=2), g.amax(dim=2)
        # Scale and offset as the kernel will use them (rounded to dtype).
        scale = ((high - low) / 15).clamp(min=1e-6).to(dtype)
        offset = (low + 8 * scale.float()).to(dtype)
        q = ((g - offset.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
        q = q.to(torch.uint8).view(rows, width)
        if start + rows == out and padded > out:  # the last block takes the padding channels
            q = torch.cat((q, q.new_full((padded - out, width), 8)))
        packed[start: start + q.shape[0]] = _pack_int4(q)
        params[:, start: start + rows, 0] = scale.t()
        params[:, start: start + rows, 1] = offset.t()
    return packed, params


def _pack_int4(q: Tensor) -> Tensor:
    """Values q [n, k] in [0, 15] (n a multiple of 64) in torch's CPU int4 layout, [n, k / 2]."""
    n, k = q.shape
    blocks = q.view(n // _INT4_BLOCK, _INT4_BLOCK, k).transpose(1, 2)  # [blocks, k, 64]
    half = _INT4_BLOCK // 2
    return (blocks[..., :half] | (blocks[..., half:] << 4)).contiguous().view(n, k // 2)


@functools.cache  # once per process (a failure raises, so it is asked again)
def _check_int4_packing() -> None:
    """Our packing is torch's (its CPU kernel would otherwise read other values than the
    ones we wrote)."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (2 * _INT4_BLOCK, 64), generator=generator, dtype=torch.int32)
    try:
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    except (AttributeError, RuntimeError) as e:
        raise ConfigError(f"int4 needs torch's CPU int4 kernel, which this torch ({torch.__version__}) "
                          f"lacks ({e}); use int8, or torch 2.6 or newer") from None
    if not torch.equal(_pack_int4(probe.to(torch.uint8)), theirs):
        raise ConfigError(f"this torch ({torch.__version__}) packs int4 weights in a layout shortv does not "
                          "know; use int8, or a torch release from 2.6 to 2.14")


def _dequantize_int4(packed: Tensor, params: Tensor, group: int, out: Tensor) -> Tensor:
    """The dense weight [out_padded, in] of an int4-packed one, written into `out` (in the
    params' dtype): (q - 8) · s + z = q · s + (z - 8 s), group by group."""
    n, width = out.shape
    blocks = packed.view(n // _INT4_BLOCK, width, _INT4_BLOCK // 2)
    rows = out.view(n // _INT4_BLOCK, _INT4_BLOCK, width)
    half = _INT4_BLOCK // 2
    rows[:, :half].copy_((blocks & 15).transpose(1, 2))
    rows[:, half:].copy_((blocks >> 4).transpose(1, 2))
    scale = params[..., 0].t()[..., None]
    shift = (params[..., 1] - 8 * params[..., 0]).t()[..., None]
    out.view(n, width // group, group).mul_(scale).add_(shift)
    return out


# Per thread (two threads may run a model at once): {dtype: flat buffer}.
_WORKSPACES = threading.local()
# A buffer larger than this is not kept after its call (a big output head's, e.g. Qwen's
# 152k-row head, 1.1 GB in bfloat16, used only when every position's logits are asked).
_KEEP_BYTES = 512 << 20


@contextmanager
def _workspace(numel: int, dtype: torch.dtype) -> Iterator[Tensor]:
    """A flat buffer of `numel` elements for one dense-path call, reused by the quantized
    layers of this thread. With autograd recording, a fresh tensor each call (autograd
    keeps the weight of every layer for the backward pass)."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        yield torch.empty(numel, dtype=dtype)
        return
    buffers = _WORKSPACES.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(dtype, None)
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buffer = torch.empty(numel, dtype=dtype)
        if numel * buffer.element_size() <= _KEEP_BYTES:
            buffers[dtype] = buffer
    yield buffer[:numel]


def quantize_module(module: nn.Module, quantization: Quantization, names: list[str]) -> list[QuantizedLinear]:
    """Replace the `ops.Linear` layers `names` (dotted paths in `module`) with quantized
    ones that still hold their (meta) placeholder weight; the new layers, in order."""
    done = []
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        linear = getattr(owner, attr)
        if not isinstance(linear, Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an ops.Linear")
        quantization.check_width(linear.in_features, name)
        new = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, quantization,
                              dtype=linear.weight.dtype)
        if linear.weight.device.type != "meta":
            new = QuantizedLinear.from_linear(linear, quantization)
        setattr(owner, attr, new)
        done.append(new)
    return done


def quantization_of(module: nn.Module) -> Quantization | None:
    """The scheme of a module's quantized layers (None when it has none)."""
    return next((m.quantization for m in module.modules() if isinstance(m, QuantizedLinear)), None)


def linear_shapes(text: TextConfig) -> list[tuple[int, int]]:
    """(out, in) of every Linear layer of a decoder of config `text` (the output head
    unless it is tied to the embeddings)."""
    h, i = text.hidden_size, text.intermediate_size
    q, kv = text.heads * text.head_dim, text.kv_heads * text.head_dim
    per_layer = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    head = [] if text.tie_word_embeddings else [(text.vocab_size, h)]
    return per_layer * text.layers + head


def decoder_weight_bytes(text: TextConfig, quantization: Quantization | None,
                         dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a decoder's weights with its Linear layers quantized (or dense in dtype),
    the embeddings and norms in dtype; biases left out (a few KB)."""
    item = torch.empty((), dtype=dtype).element_size()
    dense = (text.vocab_size * text.hidden_size + (2 * text.layers + 1) * text.hidden_size) * item
    return dense + sum(linear_bytes(out, width, quantization, dtype) for out, width in linear_shapes(text))


def linear_bytes(out: int, width: int, quantization: Quantization | None, dtype: torch.dtype) -> int:
    """Bytes of one Linear weight [out, width] as stored (quantized values and scales)."""
    item = torch.empty((), dtype=dtype).element_size()
    if quantization is None:
        return out * width * item
    if quantization.scheme in INT8_WEIGHTS:
        return out * width + out * item
    padded = -(-out // _INT4_BLOCK) * _INT4_BLOCK
    return padded * width // 2 + (width // quantization.group_size) * padded * 2 * item


def quantize_decoder(decoder: nn.Module, quantization: Quantization) -> None:
    """Quantize the Linear layers of a loaded decoder in place. Layers that share one weight
    tensor share one quantized layer (a benchmark's shared layers); a layer whose weight is
    also an embedding table's (a tied output head) stays dense."""
    embedded = {id(m.weight) for m in decoder.modules() if isinstance(m, nn.Embedding)}
    shared: dict[int, QuantizedLinear] = {}
    for name, module in list(decoder.named_modules()):
        if not isinstance(module, Linear) or id(module.weight) in embedded:
            continue
        key = id(module.weight)
        if key not in shared:
            shared[key] = quantize_module(decoder, quantization, [name])[0]
        else:
            owner_name, _, attr = name.rpartition(".")
            setattr(decoder.get_submodule(owner_name) if owner_name else decoder, attr, shared[key])
