"""`argen generate`: one prompt's completion, streamed (or `--n` samples, or `--json`); image models
take their own branch (cli/images.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, cast

from argen.cache.press import make_press
from argen.cli.images import generate_images
from argen.cli.options import add_model_options, add_sampling_options, model_spec, parse_options, sampling_options
from argen.engine import Result
from argen.errors import ArgenError
from argen.images import is_image_model
from argen.prompt_edit import PromptEdit
from argen.sampling import SamplingParams
from argen.setprompt import SetPrompt
from argen.strategies import make_strategy


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion for a prompt", description="Generate a completion.")
    p.add_argument("prompt", nargs="?", help="the prompt text (sent as a user chat message unless --no-chat)")
    add_model_options(p)
    add_sampling_options(
        p,
        "SamplingParams' defaults",
        {"max_new_tokens": 128, "temperature": 0.0, "strategy": "plain"},
        seed_help="sampling seed; a random one is drawn and reported if omitted",
    )
    p.add_argument(
        "--n",
        type=int,
        default=1,
        help="samples of the prompt, prefilled once; sample i uses seed + i (default: %(default)s)",
    )
    p.add_argument(
        "--logprobs",
        type=int,
        metavar="K",
        help="show each generated token's log-prob and its K likeliest alternatives (0-20), on stderr",
    )
    p.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="TOKEN=BIAS",
        help="add BIAS (-100..100) to TOKEN's logit (a token id, or text that is one token); repeatable",
    )
    p.add_argument("--presence-penalty", type=float, help="OpenAI's, -2..2, over the generated tokens")
    p.add_argument("--frequency-penalty", type=float, help="OpenAI's, -2..2, over the generated tokens")
    p.add_argument(
        "--press",
        help="KV-cache press (streaming-llm, kvmerger, h2o, snapkv, prefix-kv, kv-quant, gear; see 'argen models'); default: none",
    )
    p.add_argument(
        "--press-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="press option (repeatable), e.g. budget=0.5 (the fraction of positions kept)",
    )
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument(
        "--set-prompt-json",
        metavar="FILE_OR_JSON",
        help='instead of PROMPT: {"set_prompt": {"prefix": ..., "members": [...], "suffix": ...}}, '
        "members seen as an unordered set (set-based prompting)",
    )
    p.add_argument(
        "--intervene",
        action="append",
        default=[],
        metavar="POS=TOKEN",
        help="counterfactual: force output token POS (0-based) to TOKEN (a token id, or text that is "
        "one token), same sampling noise everywhere else; repeatable",
    )
    p.add_argument(
        "--edit",
        metavar="START:END=TEXT",
        help="generate for PROMPT with characters START..END-1 replaced by TEXT (5:5=x inserts, 5:9= deletes): "
        "PROMPT is prefilled first, then the edited prompt reuses its keys after the edit, moved to their new "
        "positions (PIE: lossy; the share of the prefill reused goes to stderr)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, stats) instead")
    images = p.add_argument_group("image models (--model digits-ar, digits-diffusion)")
    images.add_argument("--labels", help="comma-separated class labels, one image each, e.g. 0,1,2")
    images.add_argument("--out", metavar="PNG", help="write the images as a PNG grid here")
    fmt = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under the schema in FILE")
    fmt.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    fmt.add_argument("--regex", metavar="RE", help="the output matches the regular expression RE")
    fmt.add_argument(
        "--grammar", metavar="FILE", help="the output follows the Lark grammar in FILE (llguidance's dialect)"
    )
    p.set_defaults(handler=generate)


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
                raise ArgenError(
                    f"--logit-bias {pair!r}: {token!r} is {len(ids)} tokens ({ids}); give one token or its id"
                )
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


def _prompt(args: argparse.Namespace) -> str | SetPrompt:
    if (args.prompt is None) == (args.set_prompt_json is None):
        raise ArgenError("give either a PROMPT or --set-prompt-json (exactly one)")
    return args.prompt if args.set_prompt_json is None else SetPrompt.from_json(args.set_prompt_json)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """SamplingParams fields the user set, generate's own included; the rest keep SamplingParams' defaults."""
    extra = {
        "response_format": response_format(args),
        "logprobs": args.logprobs,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
    }
    return sampling_options(args) | {k: v for k, v in extra.items() if v is not None}


def generate(args: argparse.Namespace) -> int:
    strategy = {"name": args.strategy, **parse_options(args.strategy_opt)}
    if is_image_model(args.model):
        return generate_images(args.model, args.labels, strategy, seed=args.seed, out=args.out)
    if args.labels is not None or args.out is not None:
        raise ArgenError("--labels and --out are for image models (--model digits-ar or digits-diffusion)")
    options = _options(args)
    press_opts = parse_options(args.press_opt, "press", "budget=0.5")
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
    edit = None
    if args.edit is not None:
        if not isinstance(prompt, str):
            raise ArgenError("--edit edits a PROMPT's text, not a --set-prompt-json")
        edit = PromptEdit.parse(args.edit)
        edit.apply(prompt)  # a span outside the prompt is refused before the model loads

    gen = model_spec(args).load_text()
    chat = not args.no_chat
    intervene = parse_interventions(args.intervene, gen.tokenizer) or None
    if args.logit_bias:
        options["logit_bias"] = parse_logit_bias(args.logit_bias, gen.tokenizer)
    if edit is not None:  # the previous prompt's keys in the prefix cache, for the edit to reuse
        options |= {"edit": edit}
        gen.generate(prompt, chat=chat, max_new_tokens=1, cache_prompt=True)
    if args.json or args.n > 1:
        n = args.n if args.n > 1 else None
        result = gen.generate(prompt, strategy=strategy, chat=chat, intervene=intervene, press=press, n=n, **options)
        # One prompt: n Results with n, else one Result.
        results = cast(list[Result], result) if n else [cast(Result, result)]
        if args.json:
            extra = {"intervene": intervene} if intervene else {}
            dicts = [r.as_dict() | extra for r in results]
            print(json.dumps(dicts if n else dicts[0]))
            return 0
        for r in results:
            print(
                f"--- sample {r.sample_index} (seed {r.seed}, {len(r.token_ids)} tokens, finish: {r.finish_reason}) ---"
            )
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
    final = cast("Result | None", stream.result)  # one prompt without n: one Result
    if final is not None and final.logprobs is not None:
        print_logprobs(final, gen.tokenizer, sys.stderr)
    if final is not None:
        s = final.stats
        print(
            f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, finish: {final.finish_reason}, seed: {final.seed}]",
            file=sys.stderr,
        )
        if edit is not None:
            print(f"[{edit_summary(s)}]", file=sys.stderr)
    return 0


def edit_summary(s) -> str:
    """What a prompt edit reused of the prefill (Stats of its Result)."""
    line = (
        f"edit: {s.prefill_saved:.0%} of the prompt's prefill reused ({s.cached_prompt_tokens} positions before "
        f"the edit from the prefix cache, {s.edit_moved_tokens} after it moved), prefill {s.prefill_seconds:.2f} s"
    )
    return line + (f"; {s.edit_fallback}" if s.edit_fallback else "")
