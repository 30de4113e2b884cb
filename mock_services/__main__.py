"""Run one service: ``python -m mock_services catalog --port 8102``. `bookvault services`
starts one such process per service, so any one can be killed alone."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from . import SERVICES, create_app, database_url
from .app import configured_database, prepare_database
from .errors import StartupError

# What uvicorn.run exits with when the app does not start (uvicorn.main.STARTUP_FAILURE).
STARTUP_FAILED = 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mock_services")
    parser.add_argument("service", choices=sorted(SERVICES))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--database", help="SQLAlchemy URL; default: BOOKVAULT_<SERVICE>_DATABASE_URL, else "
                                               "BOOKVAULT_DATABASE_URL with {service} replaced, else a SQLite file "
                                               "in --data-dir")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--admin", action="store_true", help="enable /_admin faults and stats")
    args = parser.parse_args(argv)
    spec = SERVICES[args.service]
    try:
        database = args.database or configured_database(spec.name, os.environ)
        if database is None:
            Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        # Before uvicorn: a database that is another service's, or cannot be opened, is one
        # line on stderr and a non-zero exit, not a traceback from the lifespan.
        asyncio.run(prepare_database(spec, database or database_url(spec.name, args.data_dir), args.scale))
    except StartupError as exc:
        print(f"python -m mock_services {spec.name}: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILED)
    app = create_app(spec, database=database, data_dir=args.data_dir, scale=args.scale, admin=args.admin)
    config = uvicorn.Config(app, host=args.host, port=args.port or spec.port, log_level="warning",
                            timeout_graceful_shutdown=1)
    server = _Server(config, app)
    server.run()
    if not server.started:  # the lifespan or the socket failed (uvicorn said why): not a clean exit
        sys.exit(STARTUP_FAILED)


class _Server(uvicorn.Server):
    """uvicorn, which on SIGINT/SIGTERM first ends the change feed's long-polls: they
    answer at once (no events), so the graceful shutdown has nothing to cancel."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        ctx = getattr(self.app.state, "ctx", None)
        if ctx is not None:
            # A signal handler runs between bytecodes: hand the wake-up to the loop.
            try:
                asyncio.get_running_loop().call_soon_threadsafe(ctx.db.stop_waiting)
            except RuntimeError:  # no loop running: nothing is waiting
                pass
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    main()
