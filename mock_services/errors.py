"""The one error body every service answers with: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

from .responses import JSONResponse

__all__ = ["ApiError", "BadRequest", "Conflict", "NotFound", "StartupError", "Unavailable", "Unprocessable",
           "WrongDatabase", "error_body", "error_response", "exception_handlers"]


class StartupError(Exception):
    """A service cannot start, for a reason one line says (no traceback): `python -m mock_services`
    prints it and exits non-zero; in process, the app's lifespan raises it."""


class WrongDatabase(StartupError):
    """The database is not this service's: another service's (its marker says so), a schema
    newer than this code, or tables that are not the service's (mock_services/migrations.py)."""


class ApiError(Exception):
    status = 500
    code = "INTERNAL"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code:  # a more precise code than the class's (OUT_OF_STOCK rather than CONFLICT)
            self.code = code


class BadRequest(ApiError):
    status = 400
    code = "BAD_REQUEST"


class NotFound(ApiError):
    status = 404
    code = "NOT_FOUND"


class Conflict(ApiError):
    status = 409
    code = "CONFLICT"


class Unprocessable(ApiError):
    status = 422
    code = "UNPROCESSABLE"


class Unavailable(ApiError):
    status = 503
    code = "SERVICE_UNAVAILABLE"


_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 400: "BAD_REQUEST"}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


def error_response(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    response = error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "ERROR"), exc.detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # Never a stack trace in a body; ServerErrorMiddleware still logs it.
    return error_response(500, "INTERNAL", "internal error")


exception_handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal}
