"""Structured logs: one JSON object per line, each carrying the trace id of the request it
belongs to, so a log line leads to its trace in Jaeger (ARCHITECTURE.md, "Telemetry").

Library code only logs; the process entry point (`bookvault gateway`) calls `configure`."""

from __future__ import annotations

import logging
import math
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
            "time": _time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", {})
        if "traceId" not in fields:  # a request's line brings its own
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                line["traceId"] = trace.format_trace_id(span.trace_id)
        line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text (swapped whole)


def _time(created: float) -> str:
    """RFC 3339 UTC with milliseconds, as `datetime.isoformat` gives it (microseconds rounded
    half to even first); the date and time of day are formatted once a second."""
    global _second
    fraction, whole = math.modf(created)
    micro = round(fraction * 1e6)
    current = int(whole) + micro // 1_000_000
    second, text = _second
    if second != current:
        text = datetime.fromtimestamp(current, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (current, text)
    return f"{text}.{micro % 1_000_000 // 1000:03d}Z"


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
