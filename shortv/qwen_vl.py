"""Qwen2-VL / Qwen2.5-VL as `shortv.load` returns them: the session over `QwenVLModel`
with Qwen's image preprocessing (`shortv.qwen_image.QwenImageProcessor`: any size,
resized to multiples of 28 within the checkpoint's pixel bounds). Everything else a loaded
model offers is `shortv.session.VisionLanguageModel`'s."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .conversation import Template
from .errors import ConfigError
from .methods import Method
from .models.batch import Encoded
from .models.qwen_vl import QwenVLModel
from .qwen_image import QwenImageProcessor, qwen_token_boxes
from .session import NO_TOKENIZER, VisionLanguageModel
from .tokenizer import Tokenizer

QWEN_TEMPLATE = "qwen2_vl"


class QwenVL(VisionLanguageModel):
    """A Qwen2-VL / Qwen2.5-VL model with ShortV and the token-reduction methods built in.

    Build one with `shortv.load(...)`. In a prompt without the template (`template=False`)
    each image is `<|vision_start|><|image_pad|><|vision_end|>`, as transformers' processor
    takes it; with the template, `<image>` in a user message marks where an image goes.
    `set_pixel_bounds` changes how large images are fed (fewer pixels, fewer tokens).
    """

    module: QwenVLModel

    @staticmethod
    def cli_template(model_path: str) -> str:
        """Qwen's chat template, whatever the path (its processors apply the checkpoint's)."""
        return QWEN_TEMPLATE

    def __init__(
        self,
        module: QwenVLModel,
        *,
        tokenizer: Tokenizer | None = None,
        template: str | Template = QWEN_TEMPLATE,
        name: str = "",
        checkpoint_dir: Path | None = None,
        missing_tokenizer: str = NO_TOKENIZER,
    ) -> None:
        super().__init__(module, processor=QwenImageProcessor.for_config(module.config),
                         tokenizer=tokenizer, template=template, name=name,
                         checkpoint_dir=checkpoint_dir, missing_tokenizer=missing_tokenizer)

    def check_method(self, method: Method) -> Method:
        """As `VisionLanguageModel.check_method`; a method that reduces the vision tower's
        tokens (VisionZip) is refused here, before any input: shortv defines it on LLaVA's
        CLIP tower (class-token attention), which Qwen's tower does not have."""
        if isinstance(method, Method) and method.reduces_images:
            raise ConfigError(f"{method.describe()} reduces the vision tower's tokens, which shortv "
                              "defines for LLaVA's CLIP tower only; use it with a LLaVA model, or "
                              "a method that works in the decoder (fastv, pdrop, dart, sparsevlm, ...)")
        return super().check_method(method)

    def visual_boxes(self, encoded: Encoded) -> list[Tensor]:
        """As `VisionLanguageModel.visual_boxes`: the resized image's merged-patch grid."""
        factor = self.module.config.vision.factor
        return [qwen_token_boxes(size, self.processor.target_size(*size), factor)
                for size in encoded.image_sizes]

    def set_pixel_bounds(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """Resize images to an area within [min_pixels, max_pixels] (Qwen's `min_pixels` /
        `max_pixels`; None keeps the checkpoint's bound)."""
        self.processor = QwenImageProcessor.for_config(self.config, min_pixels=min_pixels,
                                                       max_pixels=max_pixels)

