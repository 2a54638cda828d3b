"""`shortv serve`: the model over HTTP with OpenAI's chat-completions API and continuous
batching (`shortv.serve`). Needs the serve extra: pip install 'shortv[serve]'."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from ..errors import ConfigError
from .options import add_method, add_runtime, float_in, int_at_least, load_options, method_options

MIB = 2**20


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI chat-completions API)")
    p.add_argument("model", help="zoo name, checkpoint directory or Hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="0: any free port (default 8000)")
    p.add_argument("--name", help="the model id clients ask for (default: the model's name)")
    p.add_argument("--template", metavar="NAME",
                   help="conversation template (vicuna_v1, llava_v1, qwen2_vl, ...); default: the "
                        "zoo card's, else the model family's")
    add_runtime(p)
    add_method(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile, once per bucket of rows (1, 2, "
                        "4, ..., --max-batch): on CUDA as CUDA graphs over the whole --max-context, "
                        "elsewhere for dynamic shapes; compiled at start-up (the log says how long), "
                        "before the first client is answered; a graph compiled later is logged as a "
                        "warning and counted in /metrics")
    p.add_argument("--feature-cache-mb", type=float_in(0.0, 1e7), default=512.0, metavar="MB",
                   help="keep the visual tokens of images already seen, up to MB on the model's "
                        "device (least recently used out first): the same image sent again skips "
                        "the vision tower; 0: off (default 512)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int_at_least(1), default=16, metavar="B",
                   help="sequences decoded together: the KV cache's slots (default 16)")
    g.add_argument("--max-context", type=int_at_least(2), metavar="N",
                   help="positions each sequence may hold, prompt and answer: the KV cache "
                        "(--max-batch x N positions) is allocated at start, and a request that "
                        "cannot fit is refused with a 400 (default: the model's context)")
    g.add_argument("--max-prefill", type=int_at_least(1), default=8, metavar="P",
                   help="new requests prefilled together in one padded batch; 1: each alone "
                        "(default 8)")
    g.add_argument("--prefill-chunk", type=int_at_least(0), default=2048, metavar="N",
                   help="positions of a long prompt prefilled between two decode steps, so that "
                        "running answers keep their pace while it arrives (methods that drop "
                        "tokens prefill a prompt at once); 0: whole prompts (default 2048: only "
                        "longer prompts, such as a LLaVA-NeXT image's, are split, since each "
                        "piece costs some prefill time)")
    g.add_argument("--max-queue", type=int_at_least(0), default=64, metavar="Q",
                   help="requests waiting for a batch slot; more get a 429 (default 64)")
    g.add_argument("--max-tokens-limit", type=int_at_least(1), default=512, metavar="N",
                   help="the most max_tokens a request may ask for, and its default (default 512)")
    g.add_argument("--image-root", metavar="DIR",
                   help="let clients name local image files under DIR (paths outside it are "
                        "refused); default: no local files")
    g.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image URLs that clients send (off by default: the server "
                        "then fetches whatever its network reaches, including internal hosts)")
    g.add_argument("--image-url-timeout", type=float_in(0.0, 3600.0, open_low=True), default=10.0,
                   metavar="S", help="seconds one image download may take (default 10)")
    g.add_argument("--max-body-mb", type=float_in(0.0, 1e6, open_low=True), default=32.0, metavar="MB",
                   help="request body size limit (default 32)")
    g.add_argument("--max-image-mb", type=float_in(0.0, 1e6, open_low=True), default=20.0, metavar="MB",
                   help="one image's encoded size limit (default 20)")
    g.add_argument("--max-image-pixels", type=int_at_least(1), default=4096 * 4096, metavar="N",
                   help="one image's width x height limit (default 4096 x 4096)")
    g.add_argument("--max-images", type=int_at_least(0), default=8, metavar="N",
                   help="images in one request (default 8)")
    g.add_argument("--shutdown-timeout", type=float_in(0.0, 86400.0), default=30.0, metavar="S",
                   help="on SIGTERM / Ctrl-C, seconds in-flight requests get to finish (default 30)")
    g.add_argument("--stats-interval", type=float_in(0.0, 86400.0), default=10.0, metavar="S",
                   help="seconds between stats log lines while busy; 0: none (default 10)")
    p.set_defaults(run=run)


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def require_serve_extra() -> None:
    """ConfigError naming the extra when starlette or uvicorn is missing."""
    missing = []
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"shortv serve needs {' and '.join(missing)}: pip install 'shortv[serve]'")


def listen(host: str, port_: int) -> socket.socket:
    """A listening socket on host:port (so a taken port fails before the model loads)."""
    try:
        infos = socket.getaddrinfo(host, port_, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port_}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    from .. import load, zoo
    from ..conversation import get_template

    require_serve_extra()
    image_root = None
    if args.image_root is not None:
        image_root = Path(args.image_root).expanduser()
        if not image_root.is_dir():
            raise ConfigError(f"--image-root {args.image_root} is not a directory")
    method = method_options(args, zoo.card(args.model))  # bad options fail before anything loads
    if args.template is not None:
        get_template(args.template)
    sock = listen(args.host, args.port)
    host, bound_port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model = load(args.model, template=args.template, **load_options(args), **method)
        model.require_tokenizer()
        from ..serve.app import create_app, run_server
        from ..serve.engine import Engine
        from ..serve.limits import Limits

        limits = Limits(max_body_bytes=int(args.max_body_mb * MIB),
                        max_image_bytes=int(args.max_image_mb * MIB),
                        max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                        max_tokens=args.max_tokens_limit, image_root=image_root,
                        allow_urls=args.allow_image_urls, url_timeout=args.image_url_timeout)
        context = model.config.text.max_position_embeddings
        if args.max_context is not None and args.max_context > context:
            raise ConfigError(f"--max-context {args.max_context} is more than the model's context "
                              f"of {context} positions")
        engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue,
                        max_prefill=args.max_prefill, prefill_chunk=args.prefill_chunk or None,
                        max_context=args.max_context, stats_interval=args.stats_interval)
        logging.getLogger("shortv.serve").info("KV cache: %s", engine.kv_plan.describe())
        if args.compile:
            logging.getLogger("shortv.serve").info("compiling the decode step (warm-up) ...")
            engine.compile()
            engine.warm_up()
        model.cache_features(args.feature_cache_mb)  # after the warm-up: its images are not clients'
        name = args.name or model.name
        cache = f"feature cache {args.feature_cache_mb:g} MB" if args.feature_cache_mb else "no feature cache"

        def ready() -> None:
            print(f"shortv serve: {name} ({model.method.describe()}) on http://{host}:{bound_port}/v1 "
                  f"(max batch {args.max_batch}, queue {args.max_queue}, {cache})",
                  file=sys.stderr, flush=True)

        app = create_app(engine, limits=limits, model_name=name, on_ready=ready)
        run_server(app, engine, sock, shutdown_timeout=args.shutdown_timeout)
    finally:
        sock.close()
    return 0
