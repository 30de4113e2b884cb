"""Run one service: ``python -m mock_services catalog --port 8102``. `bookvault services`
starts one such process per service, so any one can be killed alone."""

from __future__ import annotations

import argparse

import uvicorn

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
    # Long-polls of the change feed must not hold up Ctrl-C.
    uvicorn.run(app, host=args.host, port=args.port or spec.port, log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
