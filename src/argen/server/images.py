"""/v1/images/generations' body and response: the images' classes from the body, the size check, and
the PNG each image is sent as. The images themselves are decoded in the engine's loop
(engine/images.py: an `ImageRequest` in the server's one line, its images rows of an image batch
that may hold other clients' images too); each image draws from its own generator seeded from
(the request's seed, its index), so the same request gives the same images whoever else is asking.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

from argen.images.generator import ImageResult
from argen.server import protocol as p
from argen.server.errors import APIError


def labels_of(body: p.ImageGenerationRequest, n_classes: int) -> list[int]:
    """The class of every image: `labels` (argen) or the class named by `prompt`, each n times."""
    if (body.prompt is None) == (body.labels is None):
        raise APIError(
            400, "give the images' class as prompt (e.g. '7') or as labels (one per image), not both", param="prompt"
        )
    if body.labels is not None:
        classes = list(body.labels)
    else:
        text = (body.prompt or "").strip()
        if not text.isdecimal() or not text.isascii():
            raise APIError(
                400, f"the prompt names the images' class by its number, 0..{n_classes - 1} (e.g. '7')", param="prompt"
            )
        classes = [int(text)]
    if any(c >= n_classes for c in classes):
        raise APIError(400, f"every class must be in 0..{n_classes - 1}; got {classes}", param="labels")
    if len(classes) * body.n > p.MAX_IMAGES:
        raise APIError(
            400,
            f"{len(classes)} labels x n={body.n} images; at most {p.MAX_IMAGES} a request: ask for fewer",
            param="n",
        )
    return [c for c in classes for _ in range(body.n)]


def check_size(body: p.ImageGenerationRequest, side: int) -> None:
    if body.size not in (None, f"{side}x{side}"):
        raise APIError(
            400, f"this model makes {side}x{side} images only; send size '{side}x{side}' or none", param="size"
        )


def png(image: np.ndarray, levels: int) -> bytes:
    """An 8-bit greyscale PNG of one image of grey levels 0..levels-1 (white on black, as the data).
    Hand-written (zlib and struct): the core install has no imaging library, and a greyscale PNG is
    three chunks (PNG spec, ISO/IEC 15948)."""
    grey = np.round(np.asarray(image, dtype=np.float64) * (255 / max(1, levels - 1))).astype(np.uint8)
    height, width = grey.shape
    raw = b"".join(b"\x00" + grey[row].tobytes() for row in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def response(result: ImageResult, body: p.ImageGenerationRequest, levels: int) -> p.ImagesResponse:
    data = []
    for image, label in zip(result.images, result.labels):
        if body.response_format == "pixels":
            data.append(p.ImageData(pixels=np.asarray(image).tolist(), label=int(label)))
        else:
            encoded = base64.b64encode(png(image, levels)).decode("ascii")
            data.append(p.ImageData(b64_json=encoded, label=int(label)))
    stats = p.ImageStats(
        strategy=result.strategy,
        seed=result.seed,
        target_passes_per_image=float(np.mean(result.target_passes)),
        draft_passes_per_image=float(np.mean(result.draft_passes)),
        seconds=round(result.seconds, 4),
    )
    return p.ImagesResponse(created=p.now(), data=data, argen=stats)
