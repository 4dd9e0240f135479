"""Quality of generated digits, measured against the real ones.

A classifier trained on the real training split (scikit-learn's MLPClassifier, one hidden layer):
- accuracy: how often a generated image is classified as the label it was generated for;
- Fréchet distance between the classifier's hidden features of the generated images and those of
  the held-out real images (FID's formula on this classifier's features instead of Inception's).
The held-out real images are the reference: their accuracy is the classifier's own, and the Fréchet
distance of as many real training images to them is the floor that sampling noise alone gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from argen.images.data import load_split, sklearn


@dataclass(frozen=True)
class Quality:
    accuracy: float
    frechet: float
    n: int
    nearest_l1: float  # median L1 distance (grey levels) to the nearest training image: memorization shows as ~0


def nearest_training_l1(images: np.ndarray) -> np.ndarray:
    """Per image, the L1 distance to its nearest image of the training split (0: a copy)."""
    train = load_split().train_x.astype(np.int64)
    x = np.asarray(images, dtype=np.int64).reshape(len(images), -1)
    # 100 images at a time: (100, 1497, 64) int64 is 77 MB.
    return np.concatenate([np.abs(x[i : i + 100, None, :] - train[None]).sum(-1).min(1) for i in range(0, len(x), 100)])


@lru_cache(maxsize=1)
def classifier():
    """The MLP classifier fitted on the training split (deterministic: random_state=0)."""
    sk = sklearn()
    split = load_split()
    clf = sk.neural_network.MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=600, random_state=0)
    clf.fit(split.train_x / 16.0, split.train_y)
    return clf


def features(images: np.ndarray) -> np.ndarray:
    """The classifier's hidden activations (ReLU) of images (n, 64) or (n, 8, 8) in 0..16."""
    clf = classifier()
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 16.0
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows a and b:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2). numpy only (scipy is not a dependency):
    the symmetric form keeps every square root one of a symmetric PSD matrix."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def quality(images: np.ndarray, labels: np.ndarray) -> Quality:
    images = np.asarray(images).reshape(len(images), -1)
    clf = classifier()
    accuracy = float((clf.predict(images / 16.0) == np.asarray(labels)).mean())
    reference = features(load_split().test_x)
    return Quality(
        accuracy, frechet(features(images), reference), len(images), float(np.median(nearest_training_l1(images)))
    )


def real_reference(seed: int = 0) -> tuple[Quality, Quality]:
    """(held-out real images, as many training images): the reference rows of a report."""
    split = load_split()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(split.train_x), len(split.test_x), replace=False)
    return quality(split.test_x, split.test_y), quality(split.train_x[pick], split.train_y[pick])
