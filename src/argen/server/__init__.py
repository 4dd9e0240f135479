"""The OpenAI-compatible HTTP server (`argen serve`): routes in `app`, bodies in `protocol`,
continuous batching in `scheduler`, Prometheus metrics in `metrics`, the uvicorn runner in `serve`."""

from argen.server.app import create_app

__all__ = ["create_app"]
