"""Serving: `spt-fast serve`, an HTTP server with the OpenAI chat-completions interface.

`protocol` turns a request body into a conversation and options (every bad input a 4xx with one
line) and builds the OpenAI-shaped replies and stream chunks; `app` is the ASGI application
(starlette, run by uvicorn) in front of generation.scheduler's continuous batching; `metrics`
holds the Prometheus counters and histograms behind GET /metrics.
"""
