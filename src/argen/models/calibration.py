"""A few short sample texts, tokenized at load time (`runtime.calibration_ids`), for strategies
that calibrate themselves on the model (layer-skip chooses which blocks its drafts skip with
them). Varied on purpose: prose, instructions, a list, code, arithmetic."""

from __future__ import annotations

CALIBRATION_TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press. Within fifty years, presses had spread to more "
    "than two hundred cities across Europe, and the price of books fell sharply.",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a pan, add a chopped onion and cook "
    "it until soft. Stir in two cloves of garlic, a can of tomatoes and a pinch of salt, then simmer for "
    "twenty minutes.",
    "Here are three tips for better sleep:\n1. Go to bed at the same time every night.\n2. Keep your "
    "bedroom cool, dark and quiet.\n3. Avoid screens for an hour before bed.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "If a train travels 120 kilometres in 2 hours, its average speed is 120 / 2 = 60 kilometres per hour. "
    "At that speed, it covers 180 kilometres in 3 hours.",
]


def calibration_ids(tokenizer, max_tokens: int = 96) -> list[list[int]]:
    """Each text's token ids, cut to `max_tokens` (calibration cost grows with their length)."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens] for text in CALIBRATION_TEXTS]
