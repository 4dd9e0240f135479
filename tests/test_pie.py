"""PIE (prompt edits, cache/pie.py) against hand-written references on a tiny random Llama: the moved
keys are the old prompt's unrotated keys rotated to their new positions; an edit at the very end, or
of zero length, is an ordinary prefill; edits batched together equal each alone; hostile edits are
refused."""

from __future__ import annotations

import pytest
import torch

from argen.api import Generator
from argen.engine.batch import DecodeBatch
from argen.errors import InvalidRequestError
from argen.models import tiny as tiny_models
from argen.models.llama import LlamaRuntime
from argen.models.loading import LoadedModel
from argen.prompt_edit import PromptEdit

THETA = 10000.0  # tiny_llama's rope_theta
PROMPT = [(7 * i + 3) % 250 + 3 for i in range(200)]  # 200 token ids of the byte vocabulary


@pytest.fixture
def gen() -> Generator:
    """A tiny random Llama with a prefix cache of its own (each test starts cold)."""
    model = tiny_models.tiny_llama(0)
    runtime = LlamaRuntime(model.config, model.state_dict())
    return Generator(LoadedModel("tiny-pie", runtime, tiny_models.byte_tokenizer(), lambda: model, {258}))


def cache_prompt(gen: Generator, prompt: list[int]) -> None:
    gen.generate(prompt, max_new_tokens=1, cache_prompt=True)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def unrotated_keys(gen: Generator, prompt: list[int]) -> torch.Tensor:
    """Each layer's keys before RoPE [layers, kv heads, T, head dim], from the HF model's k_proj."""
    hf, info = gen.model.hf_model, gen.runtime.info
    keys = []
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda _m, _i, out: keys.append(out[0].detach()))
        for layer in hf.model.layers
    ]
    try:
        with torch.no_grad():
            hf(torch.tensor([prompt]))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([k.view(len(prompt), info.n_kv_heads, info.head_dim).transpose(0, 1) for k in keys])


def rope_at(keys: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Keys [..., T, D] rotated to `positions` (HF Llama's default RoPE, written out)."""
    d = keys.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None]
    emb = torch.cat((angles, angles), -1)
    return (keys.double() * emb.cos() + rotate_half(keys.double()) * emb.sin()).float()


def prefilled(gen: Generator, prompt: list[int], edit: PromptEdit):
    """The edited prompt's sequence, its prefill done (the cache holds all but the pending token)."""
    batch = DecodeBatch(gen.engine, prefix_caching=False)
    request = gen._requests([prompt], False, "plain", {"max_new_tokens": 4}, edit=edit)[0]
    seq = batch.admit(0, request)
    while seq.to_prefill > 0:
        batch.step()
    return batch, seq


@pytest.mark.parametrize(
    "edit", [PromptEdit(100, 104, tokens=(9, 10, 11)), PromptEdit(90, 90, tokens=(5, 6, 7, 8, 9)), PromptEdit(60, 95)]
)
def test_moved_keys_are_the_unrotated_keys_rotated_to_their_new_positions(gen, edit):
    """Bug it caught, put in by hand: `rotate_keys` rotating by R(-shift) (the old position minus the
    new one) moves every key the wrong way."""
    cache_prompt(gen, PROMPT)
    new = edit.apply(PROMPT)
    batch, seq = prefilled(gen, PROMPT, edit)
    old_end, new_end = edit.end, edit.start + len(edit.tokens or ())
    moved = seq.stats.edit_moved_tokens
    # Every old position after the edit in a full cached block moves (the old prompt's last 8 are not).
    assert moved == 192 - old_end and seq.stats.edit_fallback == ""
    keys, _ = seq.state.cache.gathered()
    got = keys[:, :, new_end : new_end + moved]
    raw = unrotated_keys(gen, PROMPT)[:, :, old_end : old_end + moved]
    want = rope_at(raw, torch.arange(new_end, new_end + moved), THETA)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # ... and the positions before the edit are the edited prompt's own keys, computed.
    own = rope_at(unrotated_keys(gen, new)[:, :, :new_end], torch.arange(new_end), THETA)
    torch.testing.assert_close(keys[:, :, :new_end], own, atol=1e-4, rtol=1e-4)
    batch.remove(list(batch.sequences))


@pytest.mark.parametrize(
    "edit",
    [
        PromptEdit(200, 200, tokens=(4, 5, 6, 7)),  # append
        PromptEdit(198, 199, tokens=(40, 41)),  # the last prefilled token (the pending one stays)
        PromptEdit(185, 200),  # delete the end
        PromptEdit(199, 200, tokens=(99,)),  # the pending token itself
    ],
)
def test_an_edit_at_the_very_end_equals_a_full_prefill(gen, edit):
    """Bug it caught, put in by hand: counting the pending last token among the prefilled positions
    (`end = len(seq.fed)` in `_plan_edit`) moved a key into the pending token's slot."""
    cache_prompt(gen, PROMPT)
    new = edit.apply(PROMPT)
    options = {"max_new_tokens": 12, "logprobs": 0}
    edited = gen.generate(PROMPT, chat=False, edit=edit, **options)
    full = gen.generate(new, chat=False, **options)
    assert edited.prompt_ids == new
    assert edited.stats.edit_moved_tokens == 0 and edited.stats.edit_fallback == ""
    assert edited.token_ids == full.token_ids
    got = torch.tensor([r.logprob for r in edited.logprobs])
    torch.testing.assert_close(got, torch.tensor([r.logprob for r in full.logprobs]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("edit", [PromptEdit(100, 100), PromptEdit(37, 37, tokens=())])
def test_a_zero_length_edit_equals_no_edit(gen, edit):
    """Bug it caught, put in by hand: `PromptEdit.apply` keeping `previous[end + 1:]` (an off-by-one
    in the span) dropped a token where nothing was to change."""
    cache_prompt(gen, PROMPT)
    options = {"max_new_tokens": 12, "logprobs": 0}
    edited = gen.generate(PROMPT, chat=False, edit=edit, **options)
    plain = gen.generate(PROMPT, chat=False, **options)
    assert edited.prompt_ids == PROMPT
    assert edited.token_ids == plain.token_ids
    got = torch.tensor([r.logprob for r in edited.logprobs])
    torch.testing.assert_close(got, torch.tensor([r.logprob for r in plain.logprobs]), atol=1e-4, rtol=0)


def test_eight_concurrent_edits_equal_each_alone(gen):
    """Bug it caught, put in by hand: the splice rotating the keys in the previous prompt's cached
    blocks (shared by every edit of it) before copying them, instead of rotating the copy: edits in
    one batch then moved each other's keys."""
    edits = [PromptEdit(40 + 13 * i, 44 + 13 * i, tokens=tuple(range(20 + i, 23 + 2 * i))) for i in range(8)]
    options = {"max_new_tokens": 10}
    alone = []
    for e in edits:  # each from the whole prompt cached (an edit's own blocks may evict its last one)
        cache_prompt(gen, PROMPT)
        alone.append(gen.generate(PROMPT, edit=e, chat=False, **options))
    cache_prompt(gen, PROMPT)
    requests = [gen._requests([PROMPT], False, "plain", options, edit=e)[0] for e in edits]
    together = gen.engine.run(requests)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.stats.edit_moved_tokens for r in together] == [r.stats.edit_moved_tokens for r in alone]
    assert [r.stats.edit_moved_tokens for r in alone] == [192 - e.end for e in edits]


def test_an_edit_of_an_uncached_prompt_is_prefilled_in_full_and_says_so(gen):
    edit = PromptEdit(100, 104, tokens=(9, 10, 11))
    edited = gen.generate(PROMPT, chat=False, edit=edit, max_new_tokens=8)
    full = gen.generate(edit.apply(PROMPT), chat=False, max_new_tokens=8)
    assert edited.stats.edit_moved_tokens == 0
    assert "not in the prefix cache" in edited.stats.edit_fallback
    assert edited.token_ids == full.token_ids


@pytest.mark.parametrize(
    "edit, message",
    [
        (PromptEdit(150, 120), "outside the previous prompt"),
        (PromptEdit(0, 201), "outside the previous prompt"),
        (PromptEdit(-1, 3), "outside the previous prompt"),
        (PromptEdit(3, 4, text="x"), "give tokens, not text"),
        ({"start": 1}, "an edit is"),
        (PromptEdit(3, 4, tokens=(10**6,)), "outside the vocabulary"),
    ],
)
def test_hostile_edits_are_refused(gen, edit, message):
    with pytest.raises(InvalidRequestError, match=message):
        gen.generate(PROMPT, chat=False, edit=edit, max_new_tokens=2)


def test_edit_spec_of_the_command_line():
    assert PromptEdit.parse("5:9=abc") == PromptEdit(5, 9, "abc")
    assert PromptEdit.parse("5:5=") == PromptEdit(5, 5, "")
    assert PromptEdit.parse("0:3=a=b").text == "a=b"
    with pytest.raises(InvalidRequestError, match="START:END=TEXT"):
        PromptEdit.parse("5-9=abc")


CODE = "def area(width, height):\n    return width * height\n\n" * 6  # 300 bytes: 300 tokens of tiny's tokenizer


def test_the_command_line_edit_matches_the_python_api(capsys, tiny):
    from argen.cli import main  # the CLI, here only

    edit = "50:54=w * h + 0"
    code = main(["generate", CODE, "--model", "tiny-random", "--no-chat", "--max-new-tokens", "8", "--edit", edit])
    out, err = capsys.readouterr()
    assert code == 0 and "edit:" in err and "after it moved" in err
    tiny.generate(CODE, chat=False, max_new_tokens=1, cache_prompt=True)
    api = tiny.generate(CODE, chat=False, max_new_tokens=8, edit=PromptEdit.parse(edit))
    assert api.stats.edit_moved_tokens > 200
    assert out == api.text + "\n"


@pytest.mark.parametrize(
    "edit, words", [("5-9=x", "START:END=TEXT"), ("10:900=x", "outside the previous prompt"), ("9:5=", "outside")]
)
def test_bad_command_line_edits_are_one_line(capsys, edit, words):
    from argen.cli import main  # the CLI, here only

    code = main(["generate", CODE, "--model", "tiny-random", "--no-chat", "--edit", edit])
    _, err = capsys.readouterr()
    assert code != 0 and words in err and len(err.strip().splitlines()) == 1


@pytest.mark.real
def test_on_the_default_model_the_moved_keys_are_its_cached_keys_unrotated_and_rotated_anew(real):
    """The default model's runtime (its fused C forward for short feeds) stores keys rotated by HF's
    RoPE tables: PIE's keys are the previous prompt's cached keys with R(old position) removed and
    R(new position) applied, computed here from HF's tables (`rope_tables`), key by key.
    Bug it caught, put in by hand: `rotate_keys` rotating by the first moved key's new position
    (`self.cos[start]`) rather than by the shift."""
    from argen.cache.paged import SeqKV
    from argen.models.llama import rope_tables

    prompt = real.encode(CODE * 8, chat=False)[:400]
    real.runtime.kv_pool().drop_cached()
    cache_prompt(real, prompt)
    source = SeqKV(real.runtime.kv_pool(), len(prompt))
    held = source.attach_prefix(prompt, list(range(len(prompt))))
    cached, _ = source.gathered()
    source.free()
    edit = PromptEdit(150, 160, tokens=tuple(prompt[20:37]))  # 7 positions later
    batch, seq = prefilled(real, prompt, edit)
    moved = seq.stats.edit_moved_tokens
    assert moved == min(held - 160, len(prompt) + 7 - 1 - 167) >= 200  # up to the pending last token
    keys, _ = seq.state.cache.gathered()
    cos, sin = rope_tables(real.runtime.config, 1024)
    old, new = torch.arange(160, 160 + moved), torch.arange(167, 167 + moved)
    k = cached[:, :, 160 : 160 + moved].double()
    unrotated = k * cos[old].double() - rotate_half(k) * sin[old].double()  # R(-p): the inverse rotation
    want = unrotated * cos[new].double() + rotate_half(unrotated) * sin[new].double()
    torch.testing.assert_close(keys[:, :, 167 : 167 + moved], want.float(), atol=2e-4, rtol=1e-4)
    batch.remove(list(batch.sequences))
