"""Structured logs: one JSON object per line, each carrying the trace id of the request it
belongs to, so a log line leads to its trace in Jaeger (ARCHITECTURE.md, "Telemetry").

Library code only logs; the process entry point (`bookvault gateway`) calls `configure`."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from opentelemetry import trace

__all__ = ["JsonFormatter", "configure", "request_log", "REQUEST_LOGGER"]

REQUEST_LOGGER = "bookvault.requests"
_request_log = logging.getLogger(REQUEST_LOGGER)


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, the current trace id, and a record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["traceId"] = trace.format_trace_id(span.trace_id)
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def request_log(**fields: Any) -> None:
    """The one line a request leaves behind; built only when someone listens."""
    if _request_log.isEnabledFor(logging.INFO):
        _request_log.info("request", extra={"fields": fields})


def configure(stream: TextIO = sys.stderr, level: int = logging.INFO) -> logging.Handler:
    """JSON lines on `stream` for the gateway's loggers (the "bookvault" tree)."""
    # Facts no line shows, not gathered for each record (the logging HOWTO, "Optimization"):
    # the caller's file and line (a walk up the stack), thread, process and task names.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # Python 3.12+
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bookvault")
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # not twice, should the root logger also have a handler
    return handler
