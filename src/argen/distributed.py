"""Beyond one machine, with Ray (an optional extra: `pip install 'argen[ray]'`): connecting to a
cluster, and `argen serve --replicas N` through Ray Serve (N copies of the argen app, each with its
own model and scheduler, behind one OpenAI endpoint). `argen batch --ray` is in jobs/ray_batch.py."""

from __future__ import annotations

import logging
import threading
import time

from argen.api import ModelSpec
from argen.errors import ArgenError
from argen.server.app import create_app
from argen.server.companions import Companions
from argen.server.metrics import merge_by_replica

INSTALL = "pip install 'argen[ray]'"
# /metrics under --replicas: each replica publishes its registry to one named actor every PUBLISH_S
# seconds (and when scraped); any replica answers a scrape with every replica's series, labelled by
# replica. A replica silent for STALE_S seconds (gone) drops out.
METRICS_HUB, HUB_NAMESPACE = "argen-metrics", "argen"
PUBLISH_S, STALE_S = 1.0, 30.0
_hub = None


def require_ray():
    """The ray module, or an error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise ArgenError(f"this needs Ray (Ray Data and Ray Serve), which is not installed ({exc}); {INSTALL}") from exc
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ('auto': $RAY_ADDRESS or one running on this machine, else a new
    one here; 'local': a new one here); nothing if this process is already connected. True if this
    call connected (the caller then disconnects when done)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=None if address in (None, "auto") else address, logging_level=logging.WARNING, log_to_driver=False
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ArgenError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
    return True


class MetricsHub:
    """A Ray actor holding each replica's latest Prometheus text."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, bytes]] = {}

    def publish(self, replica: str, text: bytes) -> None:
        self._latest[replica] = (time.monotonic(), text)

    def collect(self) -> dict[str, bytes]:
        now = time.monotonic()
        self._latest = {r: (t, text) for r, (t, text) in self._latest.items() if now - t < STALE_S}
        return {r: text for r, (_, text) in self._latest.items()}


def metrics_hub():
    """The cluster's MetricsHub (made by the first caller)."""
    ray = require_ray()
    return (
        ray.remote(num_cpus=0)(MetricsHub)
        .options(name=METRICS_HUB, namespace=HUB_NAMESPACE, get_if_exists=True)
        .remote()
    )


def publish_replica_metrics(app, replica: str, hub) -> None:
    """Make `app`'s /metrics every replica's: publish this one's now and every PUBLISH_S seconds (a
    daemon thread: it ends with the replica), and answer with all of them, labelled by replica."""
    ray = require_ray()
    own = app.state.render_metrics

    def publish_forever() -> None:
        while True:
            try:
                hub.publish.remote(replica, own())
            except Exception:  # the hub is gone (the cluster is shutting down): try again later
                logging.getLogger("argen.server").debug("publishing metrics failed", exc_info=True)
            time.sleep(PUBLISH_S)

    def render() -> bytes:
        ray.get(hub.publish.remote(replica, own()))
        return merge_by_replica(ray.get(hub.collect.remote()))

    threading.Thread(target=publish_forever, name="argen-metrics-publisher", daemon=True).start()
    app.state.render_metrics = render


class ReplicaApp:
    """What one Ray Serve replica runs: the argen FastAPI app (server/app.py) over its own model.
    The app is built in the replica (`__serve_build_asgi_app__`), so the model is loaded there, never
    pickled from the driver. Its /metrics shows every replica's series (`publish_replica_metrics`)."""

    def __init__(self, model: ModelSpec, app_options: dict, companions: tuple[list, ...]) -> None:
        self.model, self.app_options, self.companions = model, app_options, companions

    def __serve_build_asgi_app__(self):
        from ray import serve

        gen = self.model.load_text()
        model_id = self.app_options.get("model_id") or self.model.source
        companions = Companions.load(gen, model_id, *self.companions)
        app = create_app(gen, companions=companions, **self.app_options)
        publish_replica_metrics(app, serve.get_replica_context().replica_id.unique_id, metrics_hub())
        return app


def serve_replicas(
    model: ModelSpec,
    app_options: dict,
    *,
    replicas: int,
    host: str,
    port: int,
    address: str | None = None,
    replica_cpus: float = 1,
    replica_gpus: float = 0,
    companions: tuple[list, ...] = ([], []),
    block: bool = True,
) -> str:
    """Serve `replicas` copies of the argen app (`create_app(gen, **app_options)`, each replica loading
    `model` itself) behind Ray Serve's HTTP proxy at host:port; returns the base URL. `block`: wait
    until Ctrl-C, then shut Ray Serve down."""
    ray = require_ray()
    from ray import serve

    started = connect(address)
    global _hub  # made here and held, so it lives as long as this driver (the replicas find it by name)
    _hub = metrics_hub()
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    ingress = serve.ingress()(ReplicaApp)
    deployment = serve.deployment(
        name="argen", num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus}
    )(ingress)
    serve.run(deployment.bind(model, app_options, companions), name="argen", route_prefix="/")
    url = f"http://{host}:{port}"
    if not block:
        return url
    print(f"[argen: {replicas} replicas behind {url}/v1 (Ray Serve); Ctrl-C to stop]", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return url
