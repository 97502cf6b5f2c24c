"""Prometheus metrics of one teacher server, on a registry of its own (one per app, so tests can
build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class TeacherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "opd_teacher_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "opd_teacher_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_scored = Counter(
            "opd_teacher_tokens_scored", "Completion tokens scored", registry=r
        )
        self.prompt_tokens = Counter("opd_teacher_prompt_tokens", "Prompt tokens read", registry=r)
        self.batch_size = Histogram(
            "opd_teacher_batch_sequences",
            "Sequences per forward batch",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "opd_teacher_batch_tokens",
            "Tokens per forward batch",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "opd_teacher_batch_seconds",
            "Time to score one batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "opd_teacher_queue_depth",
            "Sequences waiting to be scored (hf: not yet in a batch; vllm: given to the engine "
            "and not yet answered, which it schedules itself)",
            registry=r,
        )

    def observe_batch(self, sequences: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(sequences)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)
