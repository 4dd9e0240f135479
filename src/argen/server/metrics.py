"""Prometheus metrics for GET /metrics. Each server has its own registry, so several can live in
one process (tests) without clashing; the scheduler thread updates them (prometheus_client is
thread-safe)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "argen_requests",
            "Generation requests by endpoint and outcome (stop, length, "
            "cancelled, error: one per prompt of a list; rejected_4xx code: one per HTTP request)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter("argen_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.cached_prompt_tokens = Counter(
            "argen_prompt_tokens_cached",
            "Prompt tokens whose keys and values came from the prefix cache (not computed)",
            registry=r,
        )
        self.generation_tokens = Counter("argen_generation_tokens", "Tokens generated", registry=r)
        self.kv_bytes_held = Gauge(
            "argen_kv_bytes_held",
            "KV-cache bytes held by running sequences (whole blocks; blocks shared by several count once)",
            registry=r,
        )
        self.kv_bytes_used = Gauge(
            "argen_kv_bytes_used", "KV-cache bytes the running sequences' lengths need", registry=r
        )
        self.kv_blocks_held = Gauge(
            "argen_kv_blocks_held", "KV-cache blocks (16 positions) held by running sequences", registry=r
        )
        self.kv_blocks_held_peak = Gauge(
            "argen_kv_blocks_held_peak",
            "Most KV-cache blocks held at once since the server started (inside steps too)",
            registry=r,
        )
        self.kv_blocks_limit = Gauge(
            "argen_kv_blocks_limit",
            "KV-cache blocks the admitted requests' worst cases may add up to (--kv-blocks, or the whole KV memory)",
            registry=r,
        )
        self.waiting = Gauge("argen_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.running = Gauge("argen_running_requests", "Requests in the running batch", registry=r)
        self.sequences = Gauge(
            "argen_running_sequences",
            "Rows in the running batch: sequences (prefilling or decoding; a request of n samples counts n once "
            "forked) and images of image requests",
            registry=r,
        )
        self.sequences_peak = Gauge(
            "argen_running_sequences_peak",
            "Most sequences in the running batch at once since the server started",
            registry=r,
        )
        self.batch_size = Histogram(
            "argen_batch_size", "Rows (sequences and images) per scheduler step", buckets=BATCH_BUCKETS, registry=r
        )
        self.image_batch_rows = Histogram(
            "argen_image_batch_rows",
            "Images decoded in the batch each image request finished in (its own and other requests')",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "argen_step_seconds", "Wall time of one scheduler step (all sequences)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "argen_queue_seconds", "Time from arrival to admission (prefill start)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft_seconds = Histogram(
            "argen_time_to_first_token_seconds",
            "Time from arrival to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency_seconds = Histogram(
            "argen_request_latency_seconds", "Time from arrival to the last token", buckets=LATENCY_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Families:
    """A collector that yields given metric families (for rendering merged ones)."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def merge_by_replica(texts: dict[str, bytes]) -> bytes:
    """Several servers' /metrics (Prometheus text, by replica id) as one, each series labelled with
    its `replica`: a scrape through a load balancer sees every replica, and `sum without (replica)`
    aggregates them."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, family)
            samples = [sample._replace(labels={**sample.labels, "replica": replica}) for sample in family.samples]
            merged.samples = (merged.samples if merged is not family else []) + samples
    registry = CollectorRegistry()
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
