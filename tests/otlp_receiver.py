"""A local OTLP/HTTP receiver for tests: takes what an exporter POSTs to /v1/traces and
decodes it with the official `opentelemetry-proto` messages, as a collector would."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tests.scripted_http import loopback_http


@dataclass
class Received:
    spans: list[Any] = field(default_factory=list)  # opentelemetry.proto.trace.v1.Span
    resources: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0

    def wait(self, n: int, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.spans) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.spans)


def attributes(span_or_resource: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span_or_resource.attributes:
        v = kv.value
        which = v.WhichOneof("value")
        out[kv.key] = getattr(v, which) if which else None
    return out


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, Received]]:
    """(base URL, what arrived) while a receiver listens on a free loopback port."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    got = Received()
    lock = threading.Lock()

    def handle(path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        if path != "/v1/traces":
            return 404, {}, b""
        encoding = headers.get("content-encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with lock:
            got.requests += 1
            for rs in request.resource_spans:
                got.resources.append(attributes(rs.resource))
                for ss in rs.scope_spans:
                    got.spans.extend(ss.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        return 200, {"Content-Type": "application/x-protobuf"}, reply

    with loopback_http(handle) as url:
        yield url, got
