"""The `argen` command line: `generate`, `chat`, `batch`, `models`, `bench`, `serve` and `distill-draft`.

Errors caused by the user's input are printed as one line, `argen: error: ...`, with exit code 2;
a traceback means a bug. Only the completion (or its JSON) goes to stdout, each of `--n` samples
under a header line; everything else (statistics, `--logprobs` tables) goes to stderr, so `--json`
output stays parseable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from argen.errors import ArgenError
from argen.models.kernels import describe_cpu
from argen.models.quant_paths import QUANTS

PROG = "argen"


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error format (argparse's own prints the usage block too)."""

    def error(self, message: str) -> NoReturn:
        _print_error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


# -- generate ----------------------------------------------------------------------------------
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion for a prompt", description="Generate a completion.")
    p.add_argument("prompt", nargs="?", help="the prompt text (sent as a user chat message unless --no-chat)")
    p.add_argument("--model", default="default", help="model source; see 'argen models' (default: %(default)s)")
    p.add_argument("--runtime", default="auto", choices=("auto", "native", "hf"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--quant", default="auto", choices=QUANTS,
                   help="how the weights are held on CPU: auto (a GGUF's own quantized blocks where argen's kernels "
                        "build, else fp32), exact (those blocks, fp32 activations), none (fp32), q8_0/q4_1/q4_0 "
                        "(quantize fp32 weights at load) (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, help="sampling seed; a random one is drawn and reported if omitted")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.add_argument("--n", type=int, default=1, help="samples of the prompt, prefilled once; sample i uses seed + i "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--logprobs", type=int, metavar="K",
                   help="show each generated token's log-prob and its K likeliest alternatives (0-20), on stderr")
    p.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN=BIAS",
                   help="add BIAS (-100..100) to TOKEN's logit (a token id, or text that is one token); repeatable")
    p.add_argument("--presence-penalty", type=float, help="OpenAI's, -2..2, over the generated tokens")
    p.add_argument("--frequency-penalty", type=float, help="OpenAI's, -2..2, over the generated tokens")
    p.add_argument("--strategy", default="plain", help="decoding strategy; see 'argen models' (default: %(default)s)")
    p.add_argument("--strategy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option (repeatable); VALUE is read as JSON, else as a string")  # fmt: skip
    p.add_argument("--press", help="KV-cache press (streaming-llm, kvmerger, h2o, snapkv, prefix-kv, kv-quant, gear; see 'argen models'); default: none")
    p.add_argument("--press-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="press option (repeatable), e.g. budget=0.5 (the fraction of positions kept)")  # fmt: skip
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument("--set-prompt-json", metavar="FILE_OR_JSON",
                   help='instead of PROMPT: {"set_prompt": {"prefix": ..., "members": [...], "suffix": ...}}, '
                        "members seen as an unordered set (set-based prompting)")  # fmt: skip
    p.add_argument("--intervene", action="append", default=[], metavar="POS=TOKEN",
                   help="counterfactual: force output token POS (0-based) to TOKEN (a token id, or text that is "
                        "one token), same sampling noise everywhere else; repeatable")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, stats) instead")
    images = p.add_argument_group("image models (--model digits-ar, digits-diffusion)")
    images.add_argument("--labels", help="comma-separated class labels, one image each, e.g. 0,1,2")
    images.add_argument("--out", metavar="PNG", help="write the images as a PNG grid here")
    fmt = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under the schema in FILE")
    fmt.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    fmt.add_argument("--regex", metavar="RE", help="the output matches the regular expression RE")
    fmt.add_argument("--grammar", metavar="FILE", help="the output follows the Lark grammar in FILE (llguidance's dialect)")
    p.set_defaults(handler=_generate)


def response_format(args: argparse.Namespace) -> dict | None:
    """The response_format the structured-output flags ask for (None: free text)."""
    try:
        if args.json_schema:
            schema = json.loads(Path(args.json_schema).read_text())
            return {"type": "json_schema", "json_schema": {"name": Path(args.json_schema).stem, "schema": schema}}
        if args.grammar:
            return {"type": "grammar", "grammar": Path(args.grammar).read_text()}
    except OSError as exc:
        raise ArgenError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ArgenError(f"--json-schema {args.json_schema}: not JSON ({exc})") from exc
    if args.json_object:
        return {"type": "json_object"}
    return {"type": "regex", "regex": args.regex} if args.regex else None


def parse_strategy_opts(pairs: list[str], what: str = "strategy", example: str = "max_draft=8") -> dict[str, object]:
    opts: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ArgenError(f"--{what}-opt takes KEY=VALUE (for example {example}); got {pair!r}")
        if key == "name":
            raise ArgenError(f"choose the {what} with --{what} NAME, not --{what}-opt name=...")
        try:
            opts[key] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key] = raw  # plain strings need no JSON quotes
    return opts


def parse_interventions(pairs: list[str], tokenizer) -> dict[int, int]:
    """`POS=TOKEN` pairs -> {position: token id}; TOKEN is an id, or text that encodes to one token."""
    forced: dict[int, int] = {}
    for pair in pairs:
        pos, sep, token = pair.partition("=")
        if not sep or not pos.strip().isdigit() or not token:
            raise ArgenError(f"--intervene takes POS=TOKEN (for example 5=1234 or 5=' the'); got {pair!r}")
        if token.strip().isdigit():
            forced[int(pos)] = int(token)
            continue
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ArgenError(f"--intervene {pair!r}: {token!r} is {len(ids)} tokens ({ids}); give one token or its id")
        forced[int(pos)] = ids[0]
    return forced


def _prompt(args: argparse.Namespace):
    from argen.setprompt import SetPrompt

    if (args.prompt is None) == (args.set_prompt_json is None):
        raise ArgenError("give either a PROMPT or --set-prompt-json (exactly one)")
    return args.prompt if args.set_prompt_json is None else SetPrompt.from_json(args.set_prompt_json)


def _sampling_options(args: argparse.Namespace) -> dict[str, object]:
    """SamplingParams fields the user set; the rest keep SamplingParams' defaults."""
    given = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "response_format": response_format(args),
        "logprobs": args.logprobs,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
    }
    return {k: v for k, v in given.items() if v is not None}


def parse_logit_bias(pairs: list[str], tokenizer=None) -> dict[int, float]:
    """`TOKEN=BIAS` pairs -> {token id: bias}; TOKEN is an id, or (with a tokenizer) text that encodes
    to one token. Without a tokenizer, only the form is checked (ids of text tokens are left out)."""
    bias: dict[int, float] = {}
    for pair in pairs:
        token, sep, value = pair.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not token or number is None:
            raise ArgenError(f"--logit-bias takes TOKEN=BIAS (for example 1234=-100 or ' the'=5); got {pair!r}")
        if token.strip().isdigit():
            bias[int(token)] = number
        elif tokenizer is not None:
            ids = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ArgenError(f"--logit-bias {pair!r}: {token!r} is {len(ids)} tokens ({ids}); give one token or its id")
            bias[ids[0]] = number
    return bias


def print_logprobs(result, tokenizer, file) -> None:
    """A result's per-token log-probs as a table: position, token, log-prob, the likeliest alternatives."""
    print("[log-probs: position, token, log-prob, likeliest alternatives]", file=file)
    for i, record in enumerate(result.logprobs or []):
        if record is None:
            continue
        top = ", ".join(f"{tokenizer.decode([t])!r} {v:.3f}" for t, v in record.top)
        print(f"{i:>5}  {tokenizer.decode([record.token])!r:<16} {record.logprob:9.4f}  {top}", file=file)


def _generate(args: argparse.Namespace) -> int:
    from argen.images import is_image_model

    if is_image_model(args.model):
        from argen.images.cli import generate_images

        return generate_images(args, parse_strategy_opts(args.strategy_opt))
    if args.labels is not None or args.out is not None:
        raise ArgenError("--labels and --out are for image models (--model digits-ar or digits-diffusion)")
    from argen.api import load
    from argen.cache.press import make_press
    from argen.sampling import SamplingParams
    from argen.strategies import make_strategy

    options = _sampling_options(args)
    strategy = {"name": args.strategy, **parse_strategy_opts(args.strategy_opt)}
    press_opts = parse_strategy_opts(args.press_opt, "press", "budget=0.5")
    if press_opts and args.press is None:
        raise ArgenError("--press-opt needs --press NAME")
    press = None if args.press is None else {"name": args.press, **press_opts}
    # Check the options before loading the model, which can take a while (or a download).
    try:
        prompt = _prompt(args)
        SamplingParams(**options, logit_bias=parse_logit_bias(args.logit_bias))
        make_strategy(strategy)
        make_press(press)
    except ValueError as exc:
        raise ArgenError(str(exc)) from exc
    if args.n < 1:
        raise ArgenError(f"--n must be >= 1 (samples of the prompt); got {args.n}")

    gen = load(args.model, runtime=args.runtime, device=args.device, dtype=args.dtype, quant=args.quant)
    chat = not args.no_chat
    intervene = parse_interventions(args.intervene, gen.tokenizer) or None
    if args.logit_bias:
        options["logit_bias"] = parse_logit_bias(args.logit_bias, gen.tokenizer)
    if args.json or args.n > 1:
        n = args.n if args.n > 1 else None
        result = gen.generate(prompt, strategy=strategy, chat=chat, intervene=intervene, press=press, n=n, **options)
        results = result if n else [result]
        if args.json:
            extra = {"intervene": intervene} if intervene else {}
            dicts = [r.as_dict() | extra for r in results]
            print(json.dumps(dicts if n else dicts[0]))
            return 0
        for r in results:
            print(f"--- sample {r.sample_index} (seed {r.seed}, {len(r.token_ids)} tokens, finish: {r.finish_reason}) ---")
            print(r.text)
            if r.logprobs is not None:
                print(f"[sample {r.sample_index}]", file=sys.stderr)
                print_logprobs(r, gen.tokenizer, sys.stderr)
        return 0

    stream = gen.stream(prompt, strategy=strategy, chat=chat, intervene=intervene, press=press, **options)
    for event in stream:
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    result = stream.result
    if result is not None and result.logprobs is not None:
        print_logprobs(result, gen.tokenizer, sys.stderr)
    if result is not None:
        s = result.stats
        print(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, finish: {result.finish_reason}, "
              f"seed: {result.seed}]", file=sys.stderr)  # fmt: skip
    return 0


# -- models ------------------------------------------------------------------------------------
def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list model sources and decoding strategies")
    p.set_defaults(handler=_models)


def _models(args: argparse.Namespace) -> int:
    from argen.models import sources
    from argen.strategies import REGISTRY, strategy_options

    print("Model sources (--model):")
    for name, description in sources.describe_sources():
        print(f"  {name:<26} {description}")
    print("\nWeight paths (--quant): " + ", ".join(QUANTS) + f"; CPU: {describe_cpu()}")
    print(f"\nModel cache: {sources.cache_dir()}")
    print("  (downloaded and converted models; delete the directory to clear it, or set ARGEN_CACHE_DIR)")
    print("\nStrategies (--strategy NAME, options with --strategy-opt KEY=VALUE):")
    for name, cls in sorted(REGISTRY.items()):
        kind = "exact" if cls.exact else "lossy"
        opts = ", ".join(f"{k}={v!r}" for k, v in strategy_options(cls).items()) or "no options"
        print(f"  {name:<26} {kind}; {opts}")
    from argen.cache.press import PRESSES, press_options

    print("\nKV-cache presses (--press NAME, options with --press-opt KEY=VALUE; lossy below budget 1, quantizing ones always):")
    for name, cls in sorted(PRESSES.items()):
        opts = ", ".join(f"{k}={v!r}" for k, v in press_options(cls).items())
        print(f"  {name:<26} {opts} ({cls.paper})")
    return 0


# -- bench -------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    # The bench's own parser is built only when it runs, so `argen generate` never imports it.
    p = sub.add_parser("bench", help="benchmark strategies (see 'argen bench --help')", add_help=False)
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    try:
        from argen.bench import add_arguments, run
    except ImportError as exc:
        raise ArgenError(f"the benchmark suite is not available in this install ({exc})") from exc
    if args.bench_args[:1] == ["drift"]:  # moved to the repository's benchmark harness: say where
        from argen.bench import moved

        raise ArgenError(moved("drift"))
    parser = _Parser(prog=f"{PROG} bench", description="Benchmark decoding strategies.")
    add_arguments(parser)
    return run(parser.parse_args(args.bench_args))


# -- serve -------------------------------------------------------------------------------------
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a model over an OpenAI-compatible HTTP API with continuous batching.")  # fmt: skip
    p.add_argument("--model", default="default", help="model source; see 'argen models' (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--runtime", default="auto", choices=("auto", "native", "hf"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--quant", default="auto", choices=QUANTS,
                   help="how the weights are held on CPU: auto (a GGUF's own quantized blocks where argen's kernels "
                        "build, else fp32), exact (those blocks, fp32 activations), none (fp32), q8_0/q4_1/q4_0 "
                        "(quantize fp32 weights at load) (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoding at once: a request's n samples take n (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests waiting for a slot before new ones get 429 (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the model's context)")  # fmt: skip
    p.add_argument("--draft-model", action="append", default=[], metavar="NAME=SOURCE",
                   help="a draft model requests may name (strategy draft-model, option draft=NAME); loaded at start; "
                        "repeatable. The served model is always available under its --model name")  # fmt: skip
    p.add_argument("--guide-model", action="append", default=[], metavar="NAME=SOURCE",
                   help="a guide model requests may name (strategy guided, option guide_model=NAME); loaded at start; "
                        "repeatable")  # fmt: skip
    p.add_argument("--draft-head", action="append", default=[], metavar="NAME=SOURCE",
                   help="a draft head requests may name (strategy draft-head, option head=NAME; the first one when "
                        "none is named): SOURCE is 'cached' (the head `argen distill-draft` cached for --model) or a "
                        "head file; loaded at start; repeatable")  # fmt: skip
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="raise or lower a cap on a strategy option, e.g. num_beams=16, or on n (repeatable; see SECURITY.md)")
    p.add_argument("--api-key", default=os.environ.get("ARGEN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and the API description "
                        "(default: $ARGEN_API_KEY, which keeps the key out of the process list; none: open)")  # fmt: skip
    p.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="accept only requests whose Host header is one of these (repeatable; '*.example.com' "
                        "patterns work); default: any")  # fmt: skip
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from this origin (e.g. https://app.example.com; '*' for any) call the API "
                        "from a browser (CORS; repeatable); the API key is still needed; default: none")  # fmt: skip
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="larger request bodies get 413 (default: 2 MiB, 2097152)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections at most; one more closes the longest-idle one (default: %(default)s)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle connection stays open (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a request's head and body may take to arrive (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prefill long prompts in chunks of this many tokens beside the others' decode steps; 0: "
                        "each prompt whole (default: %(default)s)")  # fmt: skip
    p.add_argument("--step-tokens", type=int, default=1024,
                   help="tokens one scheduler step may run, decode rows and prefill chunks together; 0: no budget "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--prefill-slowdown", type=float, default=1.5,
                   help="while a long prompt is prefilled, the other requests run at least 1/S as fast as without "
                        "it, on average (its chunks of more than 64 tokens wait their turn); 0: they never wait "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full instead of reusing the blocks of a prefix seen before")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV-cache blocks (16 positions each) the running requests may hold: a request is admitted "
                        "when its worst case fits beside the others' (default: the whole KV memory)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    r = p.add_argument_group("Ray Serve (pip install 'argen[ray]')")
    r.add_argument("--replicas", type=int, default=0,
                   help="serve N replicas of the app (each its own model and scheduler) through Ray Serve, behind "
                        "one endpoint at --host/--port; the connection options above are then Ray's proxy's "
                        "(default: no Ray)")  # fmt: skip
    r.add_argument("--ray", default="auto", metavar="ADDRESS",
                   help="the Ray cluster for --replicas: an address, 'auto' ($RAY_ADDRESS or one on this machine, "
                        "else a new one here) or 'local' (default: %(default)s)")  # fmt: skip
    r.add_argument("--replica-cpus", type=float, default=1, help="CPUs per replica (default: %(default)s)")
    r.add_argument("--replica-gpus", type=float, default=0, help="GPUs per replica (default: %(default)s)")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    if args.max_batch < 1 or args.max_queue < 0 or (args.max_tokens is not None and args.max_tokens < 1):
        raise ArgenError("--max-batch and --max-tokens must be >= 1 and --max-queue >= 0")
    if not 0 <= args.port <= 65535:
        raise ArgenError(f"--port must be in 0..65535; got {args.port}")
    if (args.max_body_bytes is not None and args.max_body_bytes < 1024) or args.max_connections < 1:
        raise ArgenError("--max-body-bytes must be >= 1024 and --max-connections >= 1")
    if not (args.timeout_keep_alive > 0 and args.request_timeout > 0):
        raise ArgenError("--timeout-keep-alive and --request-timeout must be > 0 seconds")
    if args.prefill_chunk < 0 or args.step_tokens < 0:
        raise ArgenError("--prefill-chunk and --step-tokens must be >= 0 (0: off)")
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
    if args.replicas:
        from argen.distributed import serve_with_ray

        return serve_with_ray(args)
    try:
        from argen.server.companions import Companions
        from argen.server.guards import DEFAULT_MAX_BODY_BYTES
        from argen.server.limits import Limits
        from argen.server.serve import serve
    except ImportError as exc:
        raise ArgenError(f"the server needs fastapi, uvicorn, sse-starlette and prometheus-client ({exc})") from exc
    from argen.api import load

    limits = Limits.parse(args.limit)  # checked before the (slow) model load
    gen = load(args.model, runtime=args.runtime, device=args.device, dtype=args.dtype, quant=args.quant)
    companions = Companions.load(gen, args.model, args.draft_model, args.guide_model, args.draft_head)
    return serve(gen, args.host, args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                 max_tokens_limit=args.max_tokens, log_level=args.log_level, model_id=args.model, limits=limits,
                 companions=companions, api_key=args.api_key, allowed_hosts=args.allowed_host or None,
                 allowed_origins=args.allowed_origins or None,
                 max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, max_connections=args.max_connections,
                 timeout_keep_alive=args.timeout_keep_alive, request_timeout=args.request_timeout,
                 prefill_chunk=args.prefill_chunk or None, step_tokens=args.step_tokens or None,
                 prefix_caching=args.prefix_caching, kv_blocks=args.kv_blocks,
                 prefill_slowdown=args.prefill_slowdown or None)  # fmt: skip


# -- distill-draft -----------------------------------------------------------------------------
def _add_distill(sub) -> None:
    from argen.recipes.draft_head import RECIPE_FIELDS

    p = sub.add_parser("distill-draft", help="train a draft head for strategy draft-head from the model itself",
                       description="Self-distill an EAGLE-style draft head: the model answers prompts built from text "
                                   "on this machine, and a one-layer head learns to predict its next features and "
                                   "tokens. The head is cached beside the model (keyed by the model's fingerprint and "
                                   "the recipe); strategy draft-head then finds it.")  # fmt: skip
    p.add_argument("--model", default="default", help="model source; see 'argen models' (default: %(default)s)")
    p.add_argument("--quant", default="auto", choices=QUANTS, help="the weight path (as for generate; default: %(default)s)")
    recipe = p.add_argument_group("the recipe (each setting is part of the cache key)")
    for f in RECIPE_FIELDS:
        recipe.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f.metadata["help"] + " (default: %(default)s)")  # fmt: skip
    p.add_argument("--batch", type=int, default=32, help="prompts the model answers together (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", metavar="FILE", help="write the head here instead of the cache")
    p.add_argument("--force", action="store_true", help="train again even if this model and recipe are cached")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(handler=_distill)


def _distill(args: argparse.Namespace) -> int:
    import time

    import torch

    from argen.api import load
    from argen.recipes.draft_head import RECIPE_FIELDS, Recipe, distill, head_path

    recipe = Recipe(**{f.name: getattr(args, f.name) for f in RECIPE_FIELDS})
    recipe.check()
    if args.batch < 1 or args.threads < 0:
        raise ArgenError("--batch must be >= 1 and --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = load(args.model, runtime="native", quant=args.quant)
    target = Path(args.out) if args.out else head_path(gen.runtime, recipe)
    if target.is_file() and not args.force:
        print(f"argen: a draft head for this model and recipe is cached: {target} (--force trains it again)",
              file=sys.stderr)  # fmt: skip
        return 0
    started = time.perf_counter()
    path = distill(gen, recipe, batch=args.batch, progress=args.progress, path=Path(args.out) if args.out else None)
    print(f"argen: draft head written to {path} in {(time.perf_counter() - started) / 60:.1f} min "
          f"({torch.get_num_threads()} threads)", file=sys.stderr)  # fmt: skip
    print(path)
    return 0


# -- batch, chat (their options and code live in argen.jobs and argen.chat) ----------------------
def _add_batch(sub) -> None:
    from argen.jobs import add_arguments

    p = sub.add_parser("batch", help="run a JSONL file of requests (OpenAI batch format), resumable",
                       description="Run a file of requests through the continuous-batching loop, here or on a Ray "
                                   "cluster; results in OpenAI's batch output format, in input order.")  # fmt: skip
    add_arguments(p)
    p.set_defaults(handler=_batch)


def _batch(args: argparse.Namespace) -> int:
    from argen.jobs import run

    return run(args)


def _add_chat(sub) -> None:
    from argen.chat import add_arguments

    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming; /help for commands)",
                       description="Chat with a model over its chat template, replies streamed.")  # fmt: skip
    add_arguments(p)
    p.set_defaults(handler=_chat)


def _chat(args: argparse.Namespace) -> int:
    from argen.chat import run

    return run(args)


# -- main --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="One engine for autoregressive generation.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{generate,chat,batch,models,bench,serve,distill-draft}",
                                parser_class=_Parser)  # fmt: skip
    _add_generate(sub)
    _add_chat(sub)
    _add_batch(sub)
    _add_models(sub)
    _add_bench(sub)
    _add_serve(sub)
    _add_distill(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # Only `bench` takes arguments this parser does not know: they belong to the bench's parser.
        if extra and args.command != "bench":
            _print_error(f"unrecognized arguments: {' '.join(extra)} (see '{PROG} {args.command} --help')")
            return 2
        args.bench_args = extra
        return args.handler(args)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    except ArgenError as exc:
        _print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
