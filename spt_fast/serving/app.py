"""The HTTP server: a starlette application, run by uvicorn, in front of continuous batching.

POST /v1/chat/completions (OpenAI-compatible, streaming as server-sent events), GET /health, GET
/metrics (Prometheus). Every request's conversation is encoded as in training (oldest turns
dropped to fit, reported in the reply), queued for the scheduler thread (generation.scheduler),
and answered from the events that thread sends back. Bad input is a 4xx with one line; a full
queue is a 503 with Retry-After; a client that goes away frees its batch row at once; Ctrl-C or
SIGTERM stop accepting, let in-flight requests finish (up to a timeout), then stop the scheduler.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import SPTError
from ..generation.scheduler import Job, Scheduler
from .metrics import ServerMetrics
from .protocol import BadRequest, chunk, completion, completion_id, finish_reason, parse_chat, spt_info


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


class _Mailbox:
    """Events from the scheduler's thread to the event loop, delivered a pass at a time: each
    call_soon_threadsafe wakes the loop's thread, which then takes the GIL from the scheduler's
    thread in the middle of its pass (16 rows: 16 hand-offs a step). `post` only collects; the
    scheduler's after_step hook sends what a pass posted in one wake-up, while the next pass runs
    in C without the GIL."""

    def __init__(self):
        self.items: list = []
        self.lock = threading.Lock()

    def post(self, loop, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((loop, queue, item))

    def send(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        by_loop: dict = {}
        for loop, queue, item in items:
            by_loop.setdefault(loop, []).append((queue, item))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop that has closed: nobody waits
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


class Server:
    """The application's state: the engine, its scheduler, the metrics, and the limits."""

    def __init__(self, engine, max_batch: int = 16, max_queue: int = 64, max_tokens: int = 256,
                 cache_mb: float = 256, max_body_bytes: int = 1 << 20, model_name: str = "spt",
                 own_thread: bool = True):
        self.engine, self.model_name, self.own_thread = engine, model_name, own_thread
        self.max_tokens, self.max_body_bytes = max_tokens, max_body_bytes
        self.metrics = ServerMetrics()
        self.mailbox = _Mailbox()
        self.scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue, max_new_tokens=max_tokens,
                                   cache_bytes=int(cache_mb * 2 ** 20), on_step=self.metrics.batch_size.set,
                                   after_step=self.mailbox.send)
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                     Route("/health", self.health, methods=["GET"]),
                                     Route("/metrics", self.prometheus, methods=["GET"])],
                             lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        if self.own_thread:  # (else whoever made the server runs the scheduler's loop: see `serve`)
            self.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.scheduler.stop)

    # ---- endpoints --------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        s = self.scheduler
        return JSONResponse({"status": "ok", "layout": self.engine.config.layout, "active": len(s.active),
                             "queue": s.queue_depth, "context_cache": s.context_cache is not None})

    async def prometheus(self, request: Request) -> Response:
        self.metrics.queue_depth.set(self.scheduler.queue_depth)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Response:
        try:
            response = await self._chat(request)
        except BadRequest as exc:
            response = _error(exc.status, str(exc), {"Retry-After": "1"} if exc.status == 503 else None)
        except SPTError as exc:
            response = _error(400, str(exc))
        except Exception as exc:  # a bug: say so in one line, keep serving
            print(f"spt-fast serve: internal error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            response = _error(500, f"internal error: {type(exc).__name__}")
        self.metrics.requests.labels(str(response.status_code)).inc()
        return response

    async def _chat(self, request: Request) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise BadRequest(f"the body is larger than {self.max_body_bytes} bytes", 413)
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise BadRequest(f"the body is larger than {self.max_body_bytes} bytes", 413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed JSON: {exc}") from None
        req = parse_chat(body, self.max_tokens, self.engine.config.num_prompts)
        gen = self.engine.options(**req.options)  # SPTError (a 400) for anything the engine refuses
        ids, tags, truncated = self.engine.encode([(req.persona, req.history)])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind, value):  # (the scheduler's thread; sent after its pass: _Mailbox)
            self.mailbox.post(loop, events, (kind, value))

        # The stop strings' automaton is built here, off the scheduler's thread (a new set of stop
        # strings costs a pass over the vocabulary).
        await asyncio.to_thread(self.engine.stop_table, gen.stops)
        job = Job(ids[0], tags[0], gen, on_event, truncated=truncated[0])
        if not self.scheduler.submit(job):
            raise BadRequest("too many requests are waiting; try again shortly", 503)
        self.metrics.prompt_tokens.inc(len(job.ids))
        cid = completion_id()
        if req.stream:
            return StreamingResponse(self._stream(job, events, cid, req.model), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, job, events, cid, req.model)

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue, cid: str, model: str) -> Response:
        answered = False
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled = True  # the row is freed at the scheduler's next step
                        return Response(status_code=499)
                    continue
                if kind == "done":
                    answered = True
                    self._observe(job, value)
                    return JSONResponse(completion(cid, model, value, len(job.ids), job.cached_tokens))
                if kind == "error":
                    answered = True
                    return _error(503, value)
        finally:
            if not answered:  # cancelled (shutdown, disconnect): free the row
                job.cancelled = True

    async def _stream(self, job: Job, events: asyncio.Queue, cid: str, model: str):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        done = False
        try:
            while True:
                kind, value = await events.get()
                if kind == "prompt":
                    info = spt_info(value, job.truncated, job.cached_tokens)
                    yield sse(chunk(cid, model, {"role": "assistant", "content": ""}, extra={"spt": info}))
                elif kind == "text":
                    yield sse(chunk(cid, model, {"content": value}))
                elif kind == "done":
                    self._observe(job, value)
                    done = True
                    yield sse(chunk(cid, model, {}, finish_reason(value.finish)))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    done = True
                    yield sse({"error": {"message": value, "type": "server_error", "code": 503}})
                    return
        finally:
            if not done:  # the client went away: free its row now
                job.cancelled = True

    def _observe(self, job: Job, reply) -> None:
        now = time.perf_counter()
        self.metrics.tokens.inc(len(reply.tokens))
        self.metrics.cached_tokens.inc(job.cached_tokens)
        if job.first_token_at is not None:
            self.metrics.ttft.observe(job.first_token_at - job.submitted)
        self.metrics.latency.observe(now - job.submitted)


def serve(engine, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, max_queue: int = 64,
          max_tokens: int = 256, cache_mb: float = 256, graceful_seconds: float = 30.0) -> None:
    """Run the server until Ctrl-C / SIGTERM: uvicorn in a thread, the model in the main thread."""
    import threading

    import uvicorn

    server = Server(engine, max_batch, max_queue, max_tokens, cache_mb, own_thread=False)
    if server.scheduler.context_cache is None:
        print(f"layout '{engine.config.layout}' puts the prompt before the context: no context cache "
              "(each turn prefills its whole context)", flush=True)
    http = uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level="warning",
                                         timeout_graceful_shutdown=graceful_seconds))

    def on_signal(signum, frame):
        # The first Ctrl-C / SIGTERM: stop accepting, let in-flight requests finish (up to
        # graceful_seconds); a second: stop now. uvicorn listens for signals only in the main thread.
        http.force_exit = http.should_exit
        http.should_exit = True

    def run_http():
        try:
            http.run()
        finally:  # however uvicorn ended (a shutdown, a port in use), the model's loop ends too
            server.scheduler.stop(timeout=0)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=run_http, name="spt-http", daemon=True)
    # Before the port opens (and /health answers), so that no client pays for the first calls.
    try:
        server.scheduler.warm_up()
    except Exception as exc:  # a request would show the same fault, in its own reply
        print(f"spt-fast serve: the warm-up request failed ({type(exc).__name__}: {exc}); serving anyway",
              file=sys.stderr, flush=True)
    try:
        thread.start()
        # The model's loop runs here, in the main thread: a decode step ran 1.3-2x slower in a
        # second thread on the 2-vCPU machines (see Scheduler.run).
        server.scheduler.run()
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not http.started:
        raise SPTError(f"the server did not start on {host}:{port} (see the message above)")
