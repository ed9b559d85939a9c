"""What GET /metrics reports, in the Prometheus text format (prometheus_client, own registry)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("spt_requests", "chat completion requests by HTTP status", ["status"],
                                registry=self.registry)
        self.tokens = Counter("spt_generated_tokens", "tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("spt_prompt_tokens", "context tokens of requests", registry=self.registry)
        self.cached_tokens = Counter("spt_cached_prompt_tokens", "context tokens reused from the context cache",
                                     registry=self.registry)
        self.queue_depth = Gauge("spt_queue_depth", "requests waiting for a batch row", registry=self.registry)
        self.batch_size = Gauge("spt_batch_size", "rows in the last decode step", registry=self.registry)
        self.ttft = Histogram("spt_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("spt_request_latency_seconds", "from arrival to the last token",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
