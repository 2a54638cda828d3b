"""Text generation: greedy, sampling, streaming and batches, over the model's
prefill / step interface (`LLaVA.prefill`, `LLaVA.step`)."""

from .loop import GenerationResult, generate, stream, token_steps
from .sampling import GenerationOptions, pick
from .text import TextAssembler

__all__ = ["GenerationOptions", "GenerationResult", "TextAssembler", "generate", "pick", "stream",
           "token_steps"]
