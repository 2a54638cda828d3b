"""shortv: LLaVA-1.5 / LLaVA-NeXT and Qwen2-VL / Qwen2.5-VL in plain PyTorch, with ShortV
built in.

    import shortv
    model = shortv.load("llava-v1.6-vicuna-13b", n_frozen=24)
    print(model.chat("What is unusual about this image?", images=["photo.jpg"]))
"""

from .conversation import Template, get_template
from .errors import CheckpointError, ConfigError, InputError, ModelNotFoundError, ShortVError
from .generate import GenerationOptions, GenerationResult
from .lc import LCReport, layer_contribution
from .llava import LLaVA
from .loading import load
from .methods import DART, VTW, Compose, FastV, Method, PDrop, ShortV, SparseVLM, Vanilla, VisionZip, compose
from .models.batch import Encoded
from .models.config import LlavaConfig, TextConfig, VisionConfig
from .models.qwen_config import QwenVisionConfig, QwenVLConfig
from .models.taps import ActivationCache, HookPoint
from .qwen_vl import QwenVL
from .session import VisionLanguageModel
from .token_types import TokenType
from .tokenizer import IMAGE_PLACEHOLDER, IMAGE_TOKEN, Tokenizer
from .version import __version__ as __version__

__all__ = [
    "DART",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN",
    "VTW",
    "ActivationCache",
    "CheckpointError",
    "Compose",
    "ConfigError",
    "Encoded",
    "FastV",
    "GenerationOptions",
    "GenerationResult",
    "HookPoint",
    "InputError",
    "LCReport",
    "LLaVA",
    "LlavaConfig",
    "Method",
    "ModelNotFoundError",
    "PDrop",
    "QwenVL",
    "QwenVLConfig",
    "QwenVisionConfig",
    "ShortV",
    "ShortVError",
    "SparseVLM",
    "Template",
    "TextConfig",
    "TokenType",
    "Tokenizer",
    "Vanilla",
    "VisionConfig",
    "VisionLanguageModel",
    "VisionZip",
    "compose",
    "get_template",
    "layer_contribution",
    "load",
]
