"""`argen serve`: the options, checked before the model loads, then the server (argen.server) here
or N replicas behind Ray Serve (argen.distributed)."""

from __future__ import annotations

import argparse
import os

from argen.cli.options import (
    add_model_options,
    add_request_policy_options,
    add_scheduler_options,
    check_scheduler_options,
    limits,
    model_spec,
    scheduler_options,
)
from argen.errors import ArgenError
from argen.images import IMAGE_MODELS, load_image_model

# The server's modules (FastAPI, uvicorn, Ray Serve) are imported by the handlers below, not here:
# every `argen` command builds this parser, and only `argen serve` should pay for loading them.


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API with continuous batching.",
    )
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    add_scheduler_options(p)
    p.add_argument(
        "--max-queue",
        type=int,
        default=128,
        help="requests waiting for a slot before new ones get 429 (default: %(default)s)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="largest max_tokens a request may ask for (default: the model's context)",
    )
    add_request_policy_options(p, "requests")
    p.add_argument(
        "--api-key",
        default=os.environ.get("ARGEN_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health and the API description "
        "(default: $ARGEN_API_KEY, which keeps the key out of the process list; none: open)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="accept only requests whose Host header is one of these (repeatable; '*.example.com' "
        "patterns work); default: any",
    )
    p.add_argument(
        "--allowed-origins",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from this origin (e.g. https://app.example.com; '*' for any) call the API "
        "from a browser (CORS; repeatable); the API key is still needed; default: none",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=None, help="larger request bodies get 413 (default: 2 MiB, 2097152)"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections at most; one more closes the longest-idle one (default: %(default)s)",
    )
    p.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        help="seconds an idle connection stays open (default: %(default)s)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds a request's head and body may take to arrive (default: %(default)s)",
    )
    p.add_argument(
        "--prefill-slowdown",
        type=float,
        default=1.5,
        help="while a long prompt is prefilled, the other requests run at least 1/S as fast as without "
        "it, on average (its chunks of more than 64 tokens wait their turn); 0: they never wait "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="KV-cache blocks (16 positions each) the running requests may hold: a request is admitted "
        "when its worst case fits beside the others' (default: the whole KV memory)",
    )
    p.add_argument(
        "--image-model",
        action="append",
        default=[],
        choices=sorted(IMAGE_MODELS),
        metavar="NAME",
        help="also serve this image-token model at /v1/images/generations (repeatable; trained and cached on "
        f"first use: {', '.join(sorted(IMAGE_MODELS))})",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    r = p.add_argument_group("Ray Serve (pip install 'argen[ray]')")
    r.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="serve N replicas of the app (each its own model and scheduler) through Ray Serve, behind "
        "one endpoint at --host/--port; the connection options above are then Ray's proxy's "
        "(default: no Ray)",
    )
    r.add_argument(
        "--ray",
        default="auto",
        metavar="ADDRESS",
        help="the Ray cluster for --replicas: an address, 'auto' ($RAY_ADDRESS or one on this machine, "
        "else a new one here) or 'local' (default: %(default)s)",
    )
    r.add_argument("--replica-cpus", type=float, default=1, help="CPUs per replica (default: %(default)s)")
    r.add_argument("--replica-gpus", type=float, default=0, help="GPUs per replica (default: %(default)s)")
    p.set_defaults(handler=serve_command)


def check(args: argparse.Namespace) -> None:
    check_scheduler_options(args)
    if args.max_queue < 0 or (args.max_tokens is not None and args.max_tokens < 1):
        raise ArgenError("--max-tokens must be >= 1 and --max-queue >= 0")
    if not 0 <= args.port <= 65535:
        raise ArgenError(f"--port must be in 0..65535; got {args.port}")
    if (args.max_body_bytes is not None and args.max_body_bytes < 1024) or args.max_connections < 1:
        raise ArgenError("--max-body-bytes must be >= 1024 and --max-connections >= 1")
    if not (args.timeout_keep_alive > 0 and args.request_timeout > 0):
        raise ArgenError("--timeout-keep-alive and --request-timeout must be > 0 seconds")
    if args.prefill_chunk and args.step_tokens and args.step_tokens < args.prefill_chunk:
        raise ArgenError("--step-tokens must be at least --prefill-chunk, or a chunk could never run")
    if args.prefill_slowdown != 0 and not args.prefill_slowdown > 1:
        raise ArgenError("--prefill-slowdown must be more than 1 (e.g. 1.5), or 0 to let long prompts run unpaced")
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise ArgenError("--kv-blocks must be >= 1 (leave it out for the whole KV memory)")
    if args.api_key is not None and not args.api_key.strip():
        raise ArgenError("--api-key (or ARGEN_API_KEY) is empty; give a key, or unset it to serve without one")
    if args.replicas < 0 or args.replica_cpus < 0 or args.replica_gpus < 0:
        raise ArgenError("--replicas, --replica-cpus and --replica-gpus must be >= 0")
    if args.replicas and args.image_model:
        raise ArgenError("--image-model is served by one server process; leave out --replicas to serve images")


def app_options(args: argparse.Namespace) -> dict:
    """`create_app`'s keyword arguments from the options (plain values: they travel to Ray replicas)."""
    from argen.server.guards import DEFAULT_MAX_BODY_BYTES  # start-up cost: see the top of this module

    return {
        "model_id": args.model,
        **scheduler_options(args),
        "max_queue": args.max_queue,
        "max_tokens_limit": args.max_tokens,
        "limits": limits(args),
        "api_key": args.api_key,
        "allowed_hosts": args.allowed_host or None,
        "allowed_origins": args.allowed_origins or None,
        "max_body_bytes": args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
        "kv_blocks": args.kv_blocks,
        "prefill_slowdown": args.prefill_slowdown or None,
    }


def serve_command(args: argparse.Namespace) -> int:
    check(args)
    options = app_options(args)  # the limits are parsed here, before the (slow) model load
    if args.replicas:
        from argen.distributed import require_ray, serve_replicas  # start-up cost: see the top of this module

        require_ray()
        serve_replicas(
            model_spec(args),
            options,
            replicas=args.replicas,
            host=args.host,
            port=args.port,
            address=args.ray,
            replica_cpus=args.replica_cpus,
            replica_gpus=args.replica_gpus,
            companions=(
                list(args.draft_model),
                list(args.guide_model),
                list(args.draft_head),
                list(args.caad_store),
                list(args.small_model),
            ),
        )
        return 0
    from argen.server.companions import Companions  # start-up cost: see the top of this module
    from argen.server.serve import serve  # start-up cost, as above

    gen = model_spec(args).load_text()
    companions = Companions.load(
        gen, args.model, args.draft_model, args.guide_model, args.draft_head, args.caad_store, args.small_model
    )
    image_models = {name: load_image_model(name) for name in dict.fromkeys(args.image_model)}
    return serve(
        gen,
        args.host,
        args.port,
        log_level=args.log_level,
        companions=companions,
        image_models=image_models,
        max_connections=args.max_connections,
        timeout_keep_alive=args.timeout_keep_alive,
        request_timeout=args.request_timeout,
        **options,
    )
