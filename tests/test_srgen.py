"""Strategy srgen (self-reflective generation at test time, strategies/srgen.py), against hand-written
references: plain greedy where it never fires, the loss and Adam's steps written out by hand, the
positions it fires at read off the model's own entropies. Eight concurrent requests = each alone, on
the default model: tests/test_concurrent_real.py."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from argen.errors import InvalidRequestError
from argen.strategies import make_strategy
from argen.strategies.srgen import float_head, reflect

PROMPT = "The quick brown fox"
N = 12


def srgen(**options) -> dict:
    return {"name": "srgen", **options}


@pytest.mark.parametrize("options", [{"entropy_threshold": 1e6}, {"entropy_threshold": 0.0, "steps": 0}])
def test_never_firing_is_plain_greedy(tiny, options):
    """A threshold above log(V) never fires, and steps=0 never optimises: plain greedy, token for
    token. Bugs it caught when put in by hand: the threshold compared the wrong way (fires below it);
    Adam run for steps + 1 steps with the steps=0 guard gone (one step at steps=0)."""
    assert options["entropy_threshold"] > math.log(tiny.runtime.info.vocab_size) or options["steps"] == 0
    want = tiny.generate(PROMPT, chat=False, max_new_tokens=N, temperature=0)
    got = tiny.generate(PROMPT, chat=False, max_new_tokens=N, temperature=0, strategy=srgen(**options))
    assert got.token_ids == want.token_ids
    assert got.extras["srgen"]["triggers"] == 0


# -- the loss, its gradient and Adam's steps, by hand ----------------------------------------------
def hand_loss_and_grad(weight, bias, context, targets, hidden, delta, lam):
    """loss(δ) = mean_j CE(W (h_j + δ) + b, x_{j+1}) + λ H(softmax(W (h_t + δ) + b)) and its gradient,
    written out: d CE_j / d z = p_j - onehot(x_{j+1}); d H / d z = -p (log p + H); d / d δ = Wᵀ (...)."""
    z = (torch.cat([context, hidden[None]]) + delta) @ weight.T + bias  # [k + 1, V]
    p = torch.exp(z - torch.logsumexp(z, -1, keepdim=True))
    log_p = torch.log(p)
    k = len(targets)
    onehot = torch.zeros(k, z.shape[1])
    onehot[torch.arange(k), torch.tensor(targets)] = 1.0
    ce = -(log_p[:k] * onehot).sum() / k
    h = -(p[-1] * log_p[-1]).sum()
    dz = (p[:k] - onehot).sum(0) / k + lam * (-p[-1] * (log_p[-1] + h))
    return float(ce + lam * h), dz @ weight


def hand_adam(grads_at, lr, steps, dim, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam from δ = 0, as Kingma & Ba write it (bias-corrected moments)."""
    delta, m, v = torch.zeros(dim, dtype=torch.float64), 0.0, 0.0
    for t in range(1, steps + 1):
        g = grads_at(delta)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        delta = delta - lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    return delta


@pytest.mark.parametrize("steps", [1, 2])
def test_the_optimisation_equals_a_hand_written_loss_gradient_and_adam(tiny, steps):
    """The tiny model's head weights, random hidden states: the loss before, and the next-token logits
    after `steps` Adam steps, equal the hand-written loss, gradient and Adam update (in float64).
    Bugs it caught when put in by hand: the entropy term's sign flipped (maximising the entropy); the
    context rows' targets shifted by one (each row scored against its own token)."""
    head = float_head(tiny.runtime)
    assert head.weight is not None
    weight = head.weight.double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if head.bias is None else head.bias.double()
    gen = torch.Generator().manual_seed(0)
    width = weight.shape[1]
    context = torch.randn(5, width, generator=gen)
    hidden = torch.randn(width, generator=gen)
    targets = [3, 17, 250, 9, 40]
    lr, lam = 0.05, 0.3
    found = reflect(head, context, targets, hidden, steps=steps, lr=lr, entropy_weight=lam)

    def grads_at(delta):
        return hand_loss_and_grad(weight, bias, context.double(), targets, hidden.double(), delta, lam)[1]

    delta = hand_adam(grads_at, lr, steps, width)
    zero = torch.zeros(width, dtype=torch.float64)
    loss0 = hand_loss_and_grad(weight, bias, context.double(), targets, hidden.double(), zero, lam)[0]
    loss1 = hand_loss_and_grad(weight, bias, context.double(), targets, hidden.double(), delta, lam)[0]
    want = (hidden.double() + delta) @ weight.T + bias
    assert found.loss_before == pytest.approx(loss0, rel=1e-5)
    assert found.loss_after == pytest.approx(loss1, rel=1e-5)
    torch.testing.assert_close(found.logits.double(), want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(want, hidden.double() @ weight.T + bias, atol=1e-3)  # it did move


# -- where it fires, and what a trigger does --------------------------------------------------------
def teacher_forced_entropies(gen, prompt_ids: list[int], output: list[int]) -> list[float]:
    """The model's own next-token entropy before each output token (one forward over the sequence)."""
    runtime = gen.runtime
    ids = prompt_ids + output
    cache = runtime.new_cache(1, len(ids) + 1)
    with torch.inference_mode():
        logits, _ = runtime.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, num_logits=None)
    rows = logits[0, len(prompt_ids) - 1 : len(ids) - 1].float()
    log_p = torch.log_softmax(rows, -1)
    return (-(log_p.exp() * log_p).sum(-1)).tolist()


def test_it_fires_exactly_where_the_plain_entropy_exceeds_the_threshold(tiny):
    """The recorded positions are those of the output whose model entropy (teacher-forced, plain
    logits) exceeds the threshold, and no trigger raises its loss. Bug it caught when put in by hand:
    the position recorded one token late (n_generated + 1)."""
    plain = tiny.generate(PROMPT, chat=False, max_new_tokens=N, temperature=0)
    entropies = teacher_forced_entropies(tiny, plain.prompt_ids, plain.token_ids)
    threshold = sorted(entropies)[len(entropies) // 2] - 1e-3  # about half of the plain steps fire
    assert min(abs(e - threshold) for e in entropies) > 1e-4  # no near-tie with the threshold
    result = tiny.generate(
        PROMPT, chat=False, max_new_tokens=N, temperature=0, strategy=srgen(entropy_threshold=threshold, lr=0.5)
    )
    record = result.extras["srgen"]
    # Hand-checked against plain: the first trigger is the first plain step over the threshold (the two
    # outputs agree up to it).
    first = next(i for i, e in enumerate(entropies) if e > threshold)
    assert record["positions"][0] == first
    assert result.token_ids[:first] == plain.token_ids[:first]
    # Every position, on srgen's own output (the model's entropy there does not depend on δ).
    own = teacher_forced_entropies(tiny, result.prompt_ids, result.token_ids)
    assert min(abs(e - threshold) for e in own) > 1e-4
    assert record["positions"] == [i for i, e in enumerate(own) if e > threshold]
    assert record["triggers"] == len(record["positions"]) == len(record["ms"])
    assert record["entropy"] == pytest.approx([own[i] for i in record["positions"]], abs=1e-4)
    assert all(a <= b for a, b in zip(record["loss_after"], record["loss_before"], strict=True))
    assert result.token_ids != plain.token_ids  # a strong step does change the output


def test_max_triggers_bounds_the_work(tiny):
    result = tiny.generate(
        PROMPT, chat=False, max_new_tokens=N, temperature=0, strategy=srgen(entropy_threshold=0.0, max_triggers=3)
    )
    assert result.extras["srgen"]["positions"] == [0, 1, 2]


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"steps": 17}, "steps must be an integer between 0 and 16"),
        ({"steps": -1}, "steps"),
        ({"prefix_window": 257}, "prefix_window must be an integer between 0 and 256"),
        ({"lr": float("nan")}, "option lr of strategy .srgen. must be a finite number"),
        ({"lr": 11}, "lr"),
        ({"entropy_threshold": -1}, "entropy_threshold"),
        ({"entropy_weight": 1e9}, "entropy_weight"),
        ({"max_triggers": 10**6}, "max_triggers"),
        ({"steps": 2.5}, "an integer"),
    ],
)
def test_bad_options_are_refused(bad, words):
    with pytest.raises(InvalidRequestError, match=words):
        make_strategy(srgen(**bad))


def test_the_command_line_runs_srgen(tiny, capsys):
    from argen.cli import main

    argv = ["generate", PROMPT, "--model", "tiny-random", "--no-chat", "--max-new-tokens", str(N), "--json"]
    options = ["--strategy", "srgen", "--strategy-opt", "entropy_threshold=0", "--strategy-opt", "steps=2"]
    assert main([*argv, *options]) == 0
    out = json.loads(capsys.readouterr().out)
    want = tiny.generate(PROMPT, chat=False, max_new_tokens=N, strategy=srgen(entropy_threshold=0, steps=2))
    assert out["token_ids"] == want.token_ids and out["strategy"] == "srgen"
    assert main([*argv, "--strategy", "srgen", "--strategy-opt", "steps=99"]) == 2
    assert "steps must be an integer between 0 and 16" in capsys.readouterr().err


# -- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny):
    from server_helpers import running_server

    with running_server(tiny) as (url, _):
        yield url


def post(url: str, spec, prompt=PROMPT, **fields):
    import httpx

    body = {"model": "tiny-random", "prompt": prompt, "max_tokens": N, "temperature": 0, "strategy": spec, **fields}
    return httpx.post(
        f"{url}/v1/completions",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        timeout=120,
    )


def test_the_server_runs_srgen(server, tiny):
    spec = srgen(entropy_threshold=0.0, steps=2, prefix_window=8)
    r = post(server, spec, return_token_ids=True, return_origins=True)
    assert r.status_code == 200, r.text
    want = tiny.generate(PROMPT, chat=False, max_new_tokens=N, temperature=0, strategy=spec)
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == want.token_ids
    # Where it fired reaches the client too (return_origins stats), as in the Python Result.
    record = choice["stats"]["strategy_record"]
    assert record["positions"] == want.extras["srgen"]["positions"] and record["triggers"] == N


@pytest.mark.parametrize(
    "spec, words",
    [
        (srgen(steps=10**9), "steps"),
        (srgen(steps=12), "this server allows at most 8"),  # within the strategy's bound, over the server's
        (srgen(prefix_window=200), "this server allows at most 64"),
        (srgen(prefix_window=-5), "prefix_window"),
        (srgen(lr=float("inf")), "lr"),
        (srgen(entropy_threshold="high"), "entropy_threshold"),
        (srgen(entropy_weight=-1), "entropy_weight"),
        (srgen(max_triggers=True), "max_triggers"),
        (srgen(unknown=1), "unknown option(s) unknown"),
    ],
)
def test_hostile_srgen_options_get_400(server, spec, words):
    """Bug it caught when put in by hand: the server's caps on steps and prefix_window left out
    (a client asks for 16 steps x 256 rows a token)."""
    r = post(server, spec)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_concurrent_http_requests_equal_each_alone(server, tiny):
    """Through the server's scheduler, on the tiny model at a threshold that fires at every step (so the
    batch's ~1e-5 rounding cannot move a trigger): eight concurrent requests = each alone."""
    prompts = [PROMPT, "Hello there", "One two", PROMPT + " jumps", "A", "Zebra crossing", "Foxes", "Dogs bark"]
    spec = srgen(entropy_threshold=0.0, steps=2, prefix_window=4, lr=0.5)
    alone = [tiny.generate(p, chat=False, max_new_tokens=N, temperature=0, strategy=spec) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: post(server, spec, prompt=p, return_token_ids=True), prompts))
    for r, want in zip(responses, alone, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want.token_ids
