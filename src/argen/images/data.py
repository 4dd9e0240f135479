"""The digits data: scikit-learn's bundled `load_digits` (1,797 images, 8x8 pixels, grey levels 0-16,
ten classes), split once into a training part and a held-out part that nothing here trains on.

The split is fixed (stratified, seed 0) so every model, classifier and report sees the same images.
scikit-learn ships the data inside its wheel: no download happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from argen.errors import ArgenError

N_PIXELS = 64
N_LEVELS = 17  # grey levels 0..16: one token per level
N_CLASSES = 10
HELD_OUT = 300  # images per split kept away from every model and from the classifier
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    train_x: np.ndarray  # (n, 64) int64 in 0..16, raster order (row by row)
    train_y: np.ndarray  # (n,) int64 in 0..9
    test_x: np.ndarray
    test_y: np.ndarray


def sklearn():
    """scikit-learn, or an error that says how to get it (it is the `images` extra)."""
    try:
        import sklearn  # noqa: F401
        import sklearn.datasets
        import sklearn.model_selection
        import sklearn.neural_network
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ArgenError(
            "the digits image models need scikit-learn (its bundled digits data and the quality classifier): "
            "pip install 'argen[images]'"
        ) from exc
    return sklearn


def load_split() -> DigitsSplit:
    """The fixed training / held-out split of `load_digits` (1,497 / 300 images)."""
    sk = sklearn()
    data = sk.datasets.load_digits()
    x = data.data.astype(np.int64)
    y = data.target.astype(np.int64)
    train_x, test_x, train_y, test_y = sk.model_selection.train_test_split(
        x, y, test_size=HELD_OUT, stratify=y, random_state=SPLIT_SEED
    )
    return DigitsSplit(train_x, train_y, test_x, test_y)
