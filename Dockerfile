# syntax=docker/dockerfile:1
# One image for the gateway and the six services (they ship in the same package); compose.yaml
# picks what each container runs. The default command is the gateway.

# Build stage: the package and its dependencies installed into a virtualenv, which the
# runtime stage copies whole. Build tools and pip's cache never reach the final image.
# Installing the package runs hatch_build.py, which fetches GraphiQL's browser files from the
# npm registry and checks them against gateway/graphiql/assets.lock.json (README, "GraphiQL");
# a mirror: docker build --build-arg NPM_CONFIG_REGISTRY=https://npm.example/ .
FROM python:3.12-slim-bookworm AS build
ARG NPM_CONFIG_REGISTRY=https://registry.npmjs.org/
WORKDIR /src
COPY pyproject.toml README.md hatch_build.py ./
COPY bookvault ./bookvault
COPY gateway ./gateway
COPY schema ./schema
COPY mock_services ./mock_services
RUN python -m venv /venv && /venv/bin/pip install --no-cache-dir . \
    && /venv/bin/python -c "import gateway.graphiql.assets as a; assert a.load_assets(), 'GraphiQL assets missing'"

# Runtime stage: the same slim base (the virtualenv's interpreter path stays valid), a
# non-root user, and /data owned by it, so a named volume mounted there is writable.
FROM python:3.12-slim-bookworm
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BOOKVAULT_HOST=0.0.0.0 \
    BOOKVAULT_PORT=8000 \
    BOOKVAULT_DATA_DIR=/data
RUN groupadd --system --gid 10001 bookvault \
    && useradd --system --uid 10001 --gid 10001 --no-log-init --home-dir /nonexistent --shell /usr/sbin/nologin bookvault \
    && mkdir /data && chown 10001:10001 /data
COPY --from=build /venv /venv
WORKDIR /data
USER 10001:10001
EXPOSE 8000 8101 8102 8103 8104 8105 8106
# The gateway's own liveness; compose.yaml gives each service container its own port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BOOKVAULT_PORT', '8000'), timeout=2)"]
CMD ["bookvault", "gateway"]
