"""/v1/images/generations (server/images.py, routers/images.py): the digits image-token models over
HTTP, decoded in the engine's loop (engine/images.py): rows of image batches beside the text rows, one
pass each a round, compatible requests of different clients in one batch. Tiny random models (no training), so the
file runs in seconds; what the real models draw is measured in benchmarks/digits/."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
import torch
from image_helpers import tiny_image_models
from server_helpers import metric, running_server

from argen.images import ImageGenerator
from argen.images.block_diffusion import BlockConfig, BlockDiffusionTransformer
from argen.images.models import ModelConfig, build
from argen.server import images as server_images
from argen.server import protocol as p


def _random(kind: str, hidden: int, seed: int, direct: bool = True):
    torch.manual_seed(seed)
    return build(ModelConfig(kind, hidden=hidden, layers=1, dropout=0.0, direct=direct))


@pytest.fixture(scope="module")
def image_models() -> dict[str, ImageGenerator]:
    ar = ImageGenerator.from_modules(
        _random("ar", 32, 0), "ar", draft=_random("ar", 8, 1, direct=False), name="digits-ar"
    )
    diffusion = ImageGenerator.from_modules(_random("diffusion", 32, 2), "diffusion", name="digits-diffusion")
    torch.manual_seed(3)
    block = BlockDiffusionTransformer(BlockConfig(width=16, layers=1, heads=2))
    blocks = ImageGenerator.from_modules(block, "block", name="digits-block-diffusion")
    return {"digits-ar": ar, "digits-diffusion": diffusion, "digits-block-diffusion": blocks}


@pytest.fixture(scope="module")
def server(tiny, image_models):
    with running_server(tiny, image_models=image_models, max_queue=8) as (url, _):
        yield url


def _post(url: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def _png_pixels(data: bytes) -> np.ndarray:
    """Decode the server's PNG (8-bit greyscale, filter 0 rows) by the PNG spec, independently of png()."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        assert zlib.crc32(kind + body) == int.from_bytes(data[at + 8 + length : at + 12 + length], "big")
        chunks[kind] = body
        at += 12 + length
    width, height = int.from_bytes(chunks[b"IHDR"][:4], "big"), int.from_bytes(chunks[b"IHDR"][4:8], "big")
    assert chunks[b"IHDR"][8:10] == b"\x08\x00" and b"IEND" in chunks  # 8-bit greyscale
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, width + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


def test_pngs_and_pixels_are_the_images_the_python_api_draws(server, image_models):
    """The same labels, strategy and seed give the API's images, as PNGs (grey level * 255/16) and as
    pixels. Fails if the server reorders images, drops the seed, or scales the PNG otherwise."""
    body = {"model": "digits-ar", "labels": [3, 1, 4], "n": 2, "seed": 11, "strategy": {"name": "speculative", "k": 3}}
    want = image_models["digits-ar"].generate_images_with_stats(
        [3, 3, 1, 1, 4, 4], strategy={"name": "speculative", "k": 3}, seed=11
    )
    pngs = _post(server, body)
    assert pngs.status_code == 200, pngs.text
    out = pngs.json()
    assert [d["label"] for d in out["data"]] == [3, 3, 1, 1, 4, 4]
    for image, d in zip(want.images, out["data"]):
        assert np.array_equal(_png_pixels(base64.b64decode(d["b64_json"])), np.round(image * 255 / 16))
    assert out["argen"]["seed"] == 11 and out["argen"]["strategy"]["k"] == 3
    assert out["argen"]["target_passes_per_image"] == pytest.approx(float(np.mean(want.target_passes)))
    pixels = _post(server, {**body, "response_format": "pixels"}).json()
    assert np.array_equal(np.array([d["pixels"] for d in pixels["data"]]), want.images)


def test_a_prompt_names_the_class_and_diffusion_runs_too(server):
    out = _post(server, {"model": "digits-diffusion", "prompt": "7", "n": 3, "seed": 1, "strategy": "confidence"})
    assert out.status_code == 200, out.text
    assert [d["label"] for d in out.json()["data"]] == [7, 7, 7]
    block = {"model": "digits-block-diffusion", "prompt": "3", "n": 2, "strategy": {"name": "dkv", "threshold": 0.5}}
    assert _post(server, block).status_code == 200
    unseeded = _post(server, {"model": "digits-ar", "prompt": "2", "response_format": "pixels"}).json()
    image = np.array(unseeded["data"][0]["pixels"])
    assert image.shape == (8, 8) and 0 <= image.min() <= image.max() <= 16 and unseeded["argen"]["seed"] >= 0


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"model": "digits-var", "prompt": "1"}, 404, "not served here"),
        ({"model": "/etc/passwd", "prompt": "1"}, 404, "not served here"),
        ({"model": "tiny-random", "prompt": "1"}, 404, "not served here"),  # the text model is not an image model
        ({"model": "digits-ar", "prompt": "a cat"}, 400, "by its number"),
        ({"model": "digits-ar", "prompt": "١"}, 400, "by its number"),  # an Arabic-Indic digit is not ASCII
        ({"model": "digits-ar", "prompt": "10"}, 400, "0..9"),
        ({"model": "digits-ar"}, 400, "prompt"),
        ({"model": "digits-ar", "prompt": "1", "labels": [1]}, 400, "not both"),
        ({"model": "digits-ar", "labels": [1] * 5, "n": 4}, 400, "at most 16"),
        ({"model": "digits-ar", "prompt": "1", "n": 17}, 422, "n"),
        ({"model": "digits-ar", "labels": [1] * 17}, 422, "labels"),
        ({"model": "digits-ar", "labels": [-1]}, 422, "labels"),
        ({"model": "digits-ar", "prompt": "1", "size": "1024x1024"}, 400, "8x8"),
        ({"model": "digits-ar", "prompt": "1", "strategy": "confidence"}, 400, "does not run on a ar"),
        ({"model": "digits-ar", "prompt": "1", "strategy": {"name": "jacobi", "window": 10**9}}, 400, "window"),
        ({"model": "digits-ar", "prompt": "1", "strategy": {"name": "plain", "path": "/etc"}}, 400, "unknown option"),
        ({"model": "digits-ar", "prompt": "1", "seed": -1}, 422, "seed"),
        ({"model": "digits-ar", "prompt": "1", "seed": "7"}, 422, "seed"),
        ({"model": "digits-ar", "prompt": "1", "response_format": "url"}, 422, "response_format"),
        ({"model": "digits-ar", "prompt": "1", "quality": "hd"}, 422, "quality"),
    ],
)
def test_hostile_and_mistaken_bodies_get_4xx_that_say_what_to_do(server, body, status, says):
    r = _post(server, body)
    assert r.status_code == status, r.text
    assert says in r.text


def test_images_and_text_share_the_worker_and_both_finish(server, image_models):
    """Text completions and image requests sent together all succeed, and the request counters
    count the images under their own endpoint label."""
    before = metric(httpx.get(f"{server}/metrics").text, "argen_requests_total", endpoint="images", outcome="done")
    results: list[int] = []

    def text() -> None:
        r = httpx.post(
            f"{server}/v1/completions", json={"model": "tiny-random", "prompt": "Hi", "max_tokens": 8}, timeout=60
        )
        results.append(r.status_code)

    def image(seed: int) -> None:
        results.append(_post(server, {"model": "digits-ar", "prompt": "5", "n": 4, "seed": seed}).status_code)

    threads = [threading.Thread(target=text) for _ in range(4)] + [
        threading.Thread(target=image, args=(s,)) for s in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 8
    after = metric(httpx.get(f"{server}/metrics").text, "argen_requests_total", endpoint="images", outcome="done")
    assert after - before == 4


def test_models_lists_the_image_models(server):
    ids = [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]]
    assert ids == ["tiny-random", "digits-ar", "digits-diffusion", "digits-block-diffusion"]
    assert httpx.get(f"{server}/v1/models/digits-ar").json()["context_length"] == 64


def test_png_control_a_wrong_scale_is_caught():
    """The PNG check above is not vacuous: a PNG of the raw levels (no 255/16 scaling) differs."""
    image = np.arange(64).reshape(8, 8) % 17
    assert np.array_equal(_png_pixels(server_images.png(image, 17)), np.round(image * 255 / 16))
    assert not np.array_equal(_png_pixels(server_images.png(image, 256)), np.round(image * 255 / 16))
    assert p.MAX_IMAGES == 16


# -- image requests in the engine's loop (engine/images.py): batched across clients, beside text ------------
BATCH = 16  # the batching server's --max-batch


class Gated(torch.nn.Module):
    """An AR image model whose passes wait while `gate` is closed: a request to it holds the server's
    worker inside a pass until the test opens the gate (so that others can line up meanwhile)."""

    kind = "ar"

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.gate, self.inside = inner, threading.Event(), threading.Event()
        self.n_pixels, self.n_levels, self.n_classes = inner.n_pixels, inner.n_levels, inner.n_classes
        self.gate.set()

    def forward(self, labels, pixels):
        self.inside.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.inner(labels, pixels)


@pytest.fixture(scope="module")
def batching(tiny):
    """A server with --max-batch 16 serving every image family (tests/image_helpers.py) and a gated one."""
    models = tiny_image_models()
    gated = Gated(models["digits-ar"].model)
    models["gated"] = ImageGenerator.from_modules(gated, "ar", name="gated")
    with running_server(tiny, image_models=models, max_batch=BATCH, max_queue=16) as (url, _):
        yield url, models


@contextlib.contextmanager
def every_slot_held(url: str, models: dict):
    """An image request of --max-batch images of the gated model holds every slot, and the worker inside
    its first pass, until the block ends: requests sent meanwhile wait in line. When the block ends the
    gate opens, and the held request finishes its passes (during which its rows still hold the slots)."""
    gated = models["gated"].model
    gated.gate.clear()
    gated.inside.clear()
    out, threads = _in_threads([lambda: _post(url, {"model": "gated", "labels": [0] * BATCH})])
    try:
        assert gated.inside.wait(60), "the gated request did not start"
        yield
    finally:
        gated.gate.set()
        threads[0].join(60)
    assert out[0].status_code == 200, out[0].text


def _waiting(url: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while metric(httpx.get(f"{url}/metrics").text, "argen_queue_depth") < count:
        assert time.monotonic() < deadline, "the requests did not reach the line"
        time.sleep(0.05)


def _in_threads(calls) -> list:
    out = [None] * len(calls)

    def call(i):
        out[i] = calls[i]()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    return [out, threads]


def _rows_observed(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    return metric(text, "argen_image_batch_rows_count"), metric(text, "argen_image_batch_rows_sum")


def test_eight_concurrent_clients_get_the_images_each_gets_alone_decoded_as_one_batch(batching):
    """8 clients' seeded requests (different labels and seeds, the same strategy) sent together while
    every slot is held: when the slots free up they are admitted in one round and decoded as rows of
    one batch (each request sees 16 rows: the argen_image_batch_rows histogram), and each gets the
    images it gets alone through the Python API. With per-batch randomness this fails (test_images_rows
    shows the control); with one batch per request the histogram's 16s fail."""
    url, models = batching
    strategy = {"name": "speculative", "k": 3}
    bodies = [
        {"model": "digits-ar", "labels": [i % 10, (3 * i + 1) % 10], "seed": 100 + i, "strategy": strategy}
        for i in range(8)
    ]
    count, total = _rows_observed(url)
    with every_slot_held(url, models):
        out, threads = _in_threads([lambda b=b: _post(url, {**b, "response_format": "pixels"}) for b in bodies])
        _waiting(url, 8)
    for t in threads:
        t.join(120)
    for body, r in zip(bodies, out):
        assert r.status_code == 200, r.text
        alone = models["digits-ar"].generate_images(body["labels"], strategy=strategy, seed=body["seed"])
        assert np.array_equal(np.array([d["pixels"] for d in r.json()["data"]]), alone)
    after = _rows_observed(url)
    # The 8 requests, each in a batch of 16 rows; and the gated request (16 rows of its own).
    assert (after[0] - count, after[1] - total) == (9, 9 * 16)


def test_image_rows_count_against_max_batch(batching):
    """While an image request's 16 rows hold all 16 slots, a text request waits in line: it is answered
    after the images, though it needs about 31 rounds and they still need 63 passes when the gate opens
    (so either order wins by about 30 rounds). Seen failing with image rows left out of
    DecodeBatch.slots() (the text finished first)."""
    url, models = batching
    order: list[str] = []

    def text():
        body = {"model": "tiny-random", "prompt": "Hi", "max_tokens": 30, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        order.append(f"text {r.status_code}")

    with every_slot_held(url, models):
        _, threads = _in_threads([text])
        _waiting(url, 1)
    order.append("images")  # every_slot_held returns once the held images are answered
    threads[0].join(60)
    assert order == ["images", "text 200"]


def test_an_image_request_finishes_while_a_long_text_stream_still_runs(batching):
    """Text and images take turns pass by pass: an image request sent during a long text stream is
    answered while the stream goes on (it does not wait for the text), and the stream keeps sending
    tokens afterwards (the images did not end it)."""
    url, _ = batching
    body = {"model": "tiny-random", "prompt": "Hi", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data:")
        for strategy in ({"name": "jacobi", "window": 4}, "plain"):
            r = _post(url, {"model": "digits-ar", "prompt": "4", "n": 2, "strategy": strategy})
            assert r.status_code == 200, r.text
        more = [line for line, _ in zip(lines, range(5))]
        assert all(line.startswith("data:") and "[DONE]" not in line for line in more if line)


@pytest.mark.parametrize(
    "body, says",
    [
        ({"model": "digits-var", "prompt": "1", "strategy": {"name": "scalekv", "drafters": 64}}, "drafters"),
        ({"model": "digits-var", "prompt": "1", "strategy": {"name": "scalekv", "budget": 10**6}}, "budget"),
        (
            {"model": "digits-block-diffusion", "prompt": "1", "strategy": {"name": "subblock", "sub_block": 0}},
            "sub_block",
        ),
        ({"model": "digits-ar", "labels": [1] * 16, "n": 2}, "at most 16"),
    ],
)
def test_hostile_options_are_refused_before_they_reach_a_shared_batch(batching, body, says):
    """Every option is checked before the request waits in line (a ScaleKV request with more drafter
    layers than the model has included), so no request fails midway through a batch it shares."""
    r = _post(batching[0], body)
    assert r.status_code == 400 and says in r.text, r.text
