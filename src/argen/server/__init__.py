"""The OpenAI-compatible HTTP server (`argen serve`): `app.create_app` wires the routers (`routers/`,
one per endpoint family) around a `state.ServerState`; bodies in `protocol`, response shapes in
`responses`, continuous batching in `scheduler`, Prometheus metrics in `metrics`, the uvicorn runner
in `serve`."""

from argen.server.app import create_app

__all__ = ["create_app"]
