"""The server's routes, one router per endpoint family: `generation` (/v1/completions,
/v1/chat/completions), `models` (/v1/models), `tokenizer` (vLLM's /tokenize, /detokenize,
/tokenizer_info), `monitoring` (/health, /metrics). Each route gets its app's objects through the
`Served` dependency (server/state.py); `create_app` includes the routers."""
