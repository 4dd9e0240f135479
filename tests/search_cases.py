"""Finds tiny-random cases where plain beam search returns a degenerate output, for test_search.py.

Run `python tests/search_cases.py` to print candidates; the test file pins some of them. Two kinds:
- loops: prompts whose beam output repeats a `loop_ngram`-gram (the random model rarely loops, so
  n = 3 on its byte-level tokens);
- empty outputs: the random model's own EOS is never among its top next tokens, so the test
  declares as EOS a token that beam search likes to start with (ranked 2nd..num_beams-th for the
  first output token); with length_penalty=0 the 1-token hypothesis "EOS" then wins.
"""

from __future__ import annotations

import random

import torch

WORDS = ["the", "a", "cat", "dog", "end", "stop", "hi", "ok", "no", "yes", "why", "?", "!", ".", "z", "1", "2"]


def repeated_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def first_token_ranking(runtime, ids: list[int]) -> list[int]:
    cache = runtime.new_cache(1, len(ids))
    logits, _ = runtime.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, num_logits=1)
    return logits[0, -1].argsort(descending=True).tolist()


def find_cases(gen, n_prompts: int = 60, num_beams: int = 4, loop_ngram: int = 3, max_new_tokens: int = 48):
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n_prompts)]
    loops, empties = [], []
    for prompt in prompts:
        r = gen.generate(prompt, strategy={"name": "beam", "num_beams": num_beams}, max_new_tokens=max_new_tokens)
        if repeated_ngram(r.token_ids, loop_ngram):
            loops.append(prompt)
        ranking = first_token_ranking(gen.runtime, gen.encode(prompt))
        empties.append((prompt, ranking[1:num_beams]))
    return loops, empties


if __name__ == "__main__":
    import argen

    torch.set_num_threads(1)
    loops, empties = find_cases(argen.load("tiny-random"))
    print("loop prompts:", loops)
    print("first-token candidates for a declared EOS:", empties[:8])
