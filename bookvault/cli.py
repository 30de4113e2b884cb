"""The `bookvault` command: services, gateway, demo, schema (README, "Configuration")."""

from __future__ import annotations

import argparse
import sys

from gateway.config import Settings


def _services(args: argparse.Namespace, settings: Settings):  # type: ignore[no-untyped-def]
    from mock_services.runner import service_children

    urls = {name: svc.url for name, svc in settings.services.items()}
    return service_children(urls, args.data_dir or settings.data_dir, args.scale, args.admin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bookvault", description="BookVault gateway and services")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("services", "start the six services, each in its own process"),
                        ("demo", "start the services and the gateway; prints the GraphiQL URL")):
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--scale", type=int, default=1, help="demo data size (1: 2,000 books, 5,000 orders)")
        sub.add_argument("--data-dir", help="where the services keep their SQLite files (default: ./data)")
        sub.add_argument("--admin", action="store_true", help="enable /_admin faults and stats on the services")
    commands.add_parser("gateway", help="start the gateway")
    commands.add_parser("schema", help="print the GraphQL SDL")
    sub = commands.add_parser("manifest", help="write the trusted-documents manifest of schema/examples/ "
                                               "(Apollo's persisted-query manifest format)")
    sub.add_argument("-o", "--output", help="file to write (default: standard output)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()

    if args.command == "services":
        from mock_services.runner import supervise

        return supervise(_services(args, settings))
    if args.command == "demo":
        from mock_services.runner import Child, supervise

        url = f"http://{settings.host}:{settings.port}"
        gateway = Child("gateway", [sys.executable, "-m", "bookvault.cli", "gateway"], url, tier=1)
        return supervise(_services(args, settings) + [gateway], banner=f"GraphiQL: {url}/graphql  ")
    if args.command == "gateway":
        from bookvault.app import create_app
        from gateway.logs import configure
        from gateway.serve import serve

        configure()  # one JSON line per request, on stderr
        # On SIGTERM/Ctrl-C: subscriptions are ended (gateway/serve.py), in-flight requests
        # finish (each is bounded by its deadline), then the lifespan ends the change-feed
        # long-polls; past the grace period uvicorn cancels.
        grace = settings.resilience.deadline + 1
        serve(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
              timeout_graceful_shutdown=grace)
        return 0
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
