"""Run one service: ``python -m mock_services catalog --port 8102``. `bookvault services`
starts one such process per service, so any one can be killed alone."""

from __future__ import annotations

import argparse
import asyncio
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from . import SERVICES, create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mock_services")
    parser.add_argument("service", choices=sorted(SERVICES))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--database", help="SQLAlchemy URL; default: a SQLite file in --data-dir")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--admin", action="store_true", help="enable /_admin faults and stats")
    args = parser.parse_args(argv)
    spec = SERVICES[args.service]
    app = create_app(spec, database=args.database, data_dir=args.data_dir, scale=args.scale, admin=args.admin)
    config = uvicorn.Config(app, host=args.host, port=args.port or spec.port, log_level="warning",
                            timeout_graceful_shutdown=1)
    _Server(config, app).run()


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
