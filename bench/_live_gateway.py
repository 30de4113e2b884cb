"""`bookvault gateway` for bench/live_bench.py (and a stop test), with bearer tokens verified:
until the gateway's own authentication middleware is wired, this stands in for it (HS256,
the secret in BOOKVAULT_LIVE_BENCH_SECRET). Run as a script; uvicorn as the CLI runs it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bookvault.app import create_app  # noqa: E402
from gateway import Settings  # noqa: E402
from gateway.serve import serve  # noqa: E402
from live_auth import SECRET, authenticated  # noqa: E402


def main() -> None:
    settings = Settings.from_env()
    app = create_app(settings)
    served: Any = None

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        nonlocal served
        if scope["type"] == "lifespan":
            await app(scope, receive, send)
            return
        if served is None:
            async with authenticated(app) as wrapped:  # the state exists once the lifespan ran
                served = wrapped
        await served(scope, receive, send)

    assert os.environ.get("BOOKVAULT_LIVE_BENCH_SECRET", SECRET) == SECRET
    serve(app, asgi, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=3)


if __name__ == "__main__":
    if os.environ.get("BOOKVAULT_LIVE_BENCH_PROFILE"):  # a cProfile of the gateway, written at exit
        import cProfile
        import signal

        profile = cProfile.Profile()
        signal.signal(signal.SIGTERM, lambda *_: (profile.disable(), profile.dump_stats(os.environ["BOOKVAULT_LIVE_BENCH_PROFILE"]), os._exit(0)))
        profile.enable()
    main()
