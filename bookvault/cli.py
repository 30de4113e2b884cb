"""The `bookvault` command: services, gateway, demo, schema (README, "Configuration")."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from gateway.config import Settings

SECRET_FILE = "jwt-secret"  # in the data directory: the demo's HS256 secret, kept across restarts


def _databases(template: str | None) -> dict[str, str]:
    """Each service's database URL, where one is configured (README, "The services"): its own
    BOOKVAULT_<SERVICE>_DATABASE_URL, else `template` (--database-url, else
    BOOKVAULT_DATABASE_URL) with {service} replaced. Raises StartupError on a bad one."""
    from gateway.config import DEFAULT_PORTS
    from mock_services.app import configured_database

    urls = {name: configured_database(name, os.environ, template) for name in DEFAULT_PORTS}
    return {name: url for name, url in urls.items() if url}


def _services(args: argparse.Namespace, settings: Settings):  # type: ignore[no-untyped-def]
    from mock_services.runner import service_children

    urls = {name: svc.url for name, svc in settings.services.items()}
    return service_children(urls, args.data_dir or settings.data_dir, args.scale, args.admin,
                            databases=_databases(args.database_url))


def _setup_postgres(args: argparse.Namespace) -> int:
    import asyncio

    from mock_services.pgsetup import setup

    databases = _databases(args.database_url)
    missing = [name for name in Settings.from_env().services if name not in databases]
    if missing:
        print(f"no database URL for {', '.join(missing)}: pass --database-url "
              "'postgresql+asyncpg://bv_{service}@HOST/bv_{service}' or set BOOKVAULT_<SERVICE>_DATABASE_URL",
              file=sys.stderr)
        return 2
    for line in asyncio.run(setup(args.admin_url, databases)):
        print(line)
    return 0


def demo_secret(data_dir: str, create: bool) -> str | None:
    """The demo's token secret: made once (256 random bits) and kept beside its data, so
    `bookvault token` signs what the running demo verifies."""
    path = Path(data_dir) / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


def _token(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import mint

    secret = settings.jwt.secret or demo_secret(args.data_dir or settings.data_dir, create=False)
    if not secret:
        print("no secret: set BOOKVAULT_JWT_SECRET, or start `bookvault demo` once (it makes one)", file=sys.stderr)
        return 1
    if args.staff:
        subject, customer, scopes = args.subject or "staff", args.customer, [settings.jwt.staff_scope]
    else:
        subject, customer, scopes = args.subject or f"customer-{args.customer}", args.customer, []
    print(mint(secret, subject, customer=customer, scopes=scopes, ttl=args.ttl * 3600, config=settings.jwt))
    return 0


def _workers(raw: str) -> int:
    from gateway.config import parse_workers

    try:
        return parse_workers(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number from 1 or `auto`, not {raw!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bookvault", description="BookVault gateway and services")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("services", "start the six services, each in its own process"),
                        ("demo", "start the services and the gateway; prints the GraphiQL URL")):
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--scale", type=int, default=1, help="demo data size (1: 2,000 books, 5,000 orders)")
        sub.add_argument("--data-dir", help="where the services keep their SQLite files (default: ./data)")
        sub.add_argument("--admin", action="store_true", help="enable /_admin faults and stats on the services")
        sub.add_argument("--database-url", metavar="TEMPLATE",
                         help="each service's database: a SQLAlchemy URL with {service} in it, e.g. "
                              "'postgresql+asyncpg://bv_{service}@127.0.0.1/bv_{service}' (default: "
                              "BOOKVAULT_DATABASE_URL; BOOKVAULT_<SERVICE>_DATABASE_URL wins for one service; "
                              "none: SQLite files in the data directory)")
        if name == "services":
            tasks = sub.add_subparsers(dest="task")
            setup = tasks.add_parser("setup-postgres", help="create a role and a database per service on PostgreSQL; "
                                                            "only that role may connect to it")
            setup.add_argument("--admin-url", required=True,
                               help="a superuser's (or CREATEROLE and CREATEDB) URL, e.g. "
                                    "postgresql://postgres@127.0.0.1/postgres (a password may come from PGPASSWORD)")
            # SUPPRESS: given before `setup-postgres`, the services' own --database-url is kept.
            setup.add_argument("--database-url", metavar="TEMPLATE", default=argparse.SUPPRESS,
                               help="the services' database URLs, as for `bookvault services`; each names the "
                                    "service's role, its password (if any) and its database")
    sub = commands.add_parser("gateway", help="start the gateway")
    sub.add_argument("--workers", type=_workers, metavar="N",
                     help="gateway processes sharing the port, supervised: a whole number, or `auto` (the cores "
                          "this process may use); default BOOKVAULT_WORKERS, else 1")
    sub = commands.add_parser("token", help="print a signed token (HS256) for the demo: paste it into GraphiQL's "
                                            "headers as {\"Authorization\": \"Bearer <token>\"}")
    who = sub.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer", type=int, help="a token of this customer (sees only their own data)")
    who.add_argument("--staff", action="store_true", help="a staff token (sees every customer's data)")
    sub.add_argument("--subject", help="the token's subject (default: customer-<id> or staff)")
    sub.add_argument("--ttl", type=float, default=24, help="hours until it expires (default 24)")
    sub.add_argument("--data-dir", help="where the demo keeps its secret (default: ./data)")
    commands.add_parser("schema", help="print the GraphQL SDL")
    sub = commands.add_parser("manifest", help="write the trusted-documents manifest of schema/examples/ "
                                               "(Apollo's persisted-query manifest format)")
    sub.add_argument("-o", "--output", help="file to write (default: standard output)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:  # a malformed BOOKVAULT_* variable: its name and why, no traceback
        print(f"bookvault: {exc}", file=sys.stderr)
        return 2

    if args.command in ("services", "demo"):
        from mock_services.errors import StartupError

        try:
            if args.command == "services" and args.task == "setup-postgres":
                return _setup_postgres(args)
            children = _services(args, settings)
        except StartupError as exc:
            print(f"bookvault {args.command}: {exc}", file=sys.stderr)
            return 2
    if args.command == "services":
        from mock_services.runner import supervise

        return supervise(children)
    if args.command == "demo":
        from mock_services.runner import Child, supervise

        url = f"http://{settings.host}:{settings.port}"
        if not settings.jwt.secret and not settings.jwt.jwks_url:
            # The gateway (a child process) inherits it: `bookvault token` signs with the same.
            os.environ["BOOKVAULT_JWT_SECRET"] = demo_secret(args.data_dir or settings.data_dir, create=True) or ""
        gateway = Child("gateway", [sys.executable, "-m", "bookvault.cli", "gateway"], url, tier=1,
                        port_variable="BOOKVAULT_PORT")
        return supervise(children + [gateway], banner=f"GraphiQL: {url}/graphql  ")
    if args.command == "gateway":
        from gateway.workers import Worker

        count = args.workers or settings.workers
        if count > 1 and Worker.current() is None:  # the supervisor (bookvault/workers.py); its workers go on below
            from bookvault.workers import supervise as supervise_workers

            return supervise_workers(settings, count)
        from bookvault.app import create_app
        from gateway.logs import configure
        from gateway.serve import serve

        configure()  # one JSON line per request, on stderr
        # On SIGTERM/Ctrl-C: subscriptions are ended (gateway/serve.py), in-flight requests
        # finish (each is bounded by its deadline), then the lifespan ends the change-feed
        # long-polls; past the grace period uvicorn cancels. Every connection is bounded by
        # settings.connections (gateway/connections.py).
        grace = settings.resilience.deadline + 1
        serve(create_app(settings), settings=settings, host=settings.host, port=settings.port, log_level="warning",
              timeout_graceful_shutdown=grace)
        return 0
    if args.command == "token":
        return _token(args, settings)
    if args.command == "manifest":
        import json
        from pathlib import Path

        from gateway.persisted import manifest
        from schema import SDL_PATH

        bodies = [p.read_text() for p in sorted((SDL_PATH.parent / "examples").glob("*.graphql"))]
        text = json.dumps(manifest(bodies), indent=2) + "\n"
        if args.output:
            Path(args.output).write_text(text)
        else:
            print(text, end="")
        return 0
    if args.command == "schema":
        from schema import sdl

        print(sdl(), end="")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
