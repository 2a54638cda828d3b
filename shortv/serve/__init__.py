"""`shortv serve`: the model over HTTP, in OpenAI's chat-completions format, with
continuous batching across requests (docs/design.md §11).

- `limits`: what one request may ask of the server (`Limits`);
- `errors`: how a request fails: `RequestError` (an HTTP status in OpenAI's error shape),
  and the engine's `EngineError`, named by kind (`Refusal`), each kind with one status;
- `protocol`: request checking (`parse_chat_request`) and the response and chunk shapes;
- `images`: `data:` URLs and local files under the image root, with size limits;
- `engine`: the batching engine (`Engine`, `Job`), one worker thread driving the model;
- `compiled`: the engine's decode step, eager or compiled and warmed up (`DecodeStep`), and
  `compile_for_serving` (a model's decode step compiled for changing batches);
- `app`: the Starlette app (`create_app`) and the uvicorn runner (`run_server`); these
  need the `serve` extra: `pip install 'shortv[serve]'`.
"""

from .compiled import compile_for_serving
from .engine import Engine, Job
from .errors import RequestError
from .limits import Limits
from .protocol import ChatRequest, parse_chat_request

__all__ = ["ChatRequest", "Engine", "Job", "Limits", "RequestError", "compile_for_serving",
           "parse_chat_request"]
