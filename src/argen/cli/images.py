"""`argen generate --model digits-ar --labels 0,1,2 --out grid.png`: the image branch of `argen generate`."""

from __future__ import annotations

import sys

from argen.errors import ArgenError
from argen.images import IMAGE_MODELS, load_image_model, save_grid
from argen.images.generator import parse_strategy


def parse_labels(text: str | None) -> list[int]:
    if not text:
        raise ArgenError("an image model needs --labels, e.g. --labels 0,1,2 (one image per label)")
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ArgenError(f"--labels is a comma-separated list of integers, e.g. 0,1,2; got {text!r}") from exc


def generate_images(model: str, labels_text: str | None, strategy: dict, *, seed: int | None, out: str | None) -> int:
    labels = parse_labels(labels_text)
    parse_strategy(strategy, IMAGE_MODELS[model.partition("@")[0]][0])  # before a load that may train
    gen = load_image_model(model)
    result = gen.generate_images_with_stats(labels, strategy=strategy, seed=seed)
    if out:
        save_grid(result.images, out, result.labels)
    else:  # no file: the grey levels as text, one image after another
        for label, image in zip(result.labels, result.images):
            print(f"label {label}:")
            print("\n".join(" ".join(f"{v:2d}" for v in row) for row in image))
    passes = result.target_passes.mean()
    print(
        f"[{len(labels)} images, {passes:.1f} passes/image, {result.seconds:.2f} s, seed: {result.seed}"
        + (f", written to {out}" if out else "")
        + "]",
        file=sys.stderr,
    )
    return 0
