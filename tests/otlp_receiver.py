"""A tiny OTLP/HTTP receiver on 127.0.0.1 (a free port): it answers what Jaeger answers
and keeps what it was sent, so a test can decode the wire format. bench/ uses it too."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OtlpReceiver", "Export"]


@dataclass(frozen=True)
class Export:
    path: str
    content_type: str
    body: bytes


class OtlpReceiver:
    def __init__(self) -> None:
        self.exports: list[Export] = []
        self.received = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.exports.append(Export(self.path, self.headers.get("content-type", ""), body))
                receiver.received.set()
                # An empty ExportTraceServiceResponse: everything accepted.
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL, as in OTEL_EXPORTER_OTLP_ENDPOINT (the exporter adds /v1/traces)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Every span received, as (resource attributes, opentelemetry.proto Span)."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        found = []
        for export in self.exports:
            request = ExportTraceServiceRequest.FromString(export.body)
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                found += [(resource, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return found

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
