# syntax=docker/dockerfile:1
# One image for every `kizo` command (api, worker, janitor, bank, migrate, keys, admin, ...):
#   docker build -t kizo .        docker run --rm kizo --help
# Built in two stages: the first installs the locked dependencies with uv (the version the
# Makefile pins), the second keeps only the virtual environment and the checkout, and runs as
# an unprivileged user. compose.yaml runs it against the real PostgreSQL and Valkey images
# (DATABASE_URL, REDIS_URL); the embedded-server wheels are installed (they are runtime
# dependencies of the package) but never started when those are set. docs/operations.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
# Dependencies first, from the lock alone: this layer is rebuilt only when uv.lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-install-project --python /usr/local/bin/python3
# Then the project itself (the packages, migrations/ and the files they read at run time).
COPY kizo ./kizo
COPY infra ./infra
COPY engine ./engine
COPY actors ./actors
COPY api ./api
COPY chaos ./chaos
COPY migrations ./migrations
COPY toxiproxy ./toxiproxy
COPY observability ./observability
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --python /usr/local/bin/python3 \
    && /app/.venv/bin/python -m compileall -q kizo infra engine actors api chaos

FROM ${PYTHON_IMAGE}
# A fixed uid and gid, so volumes and file permissions are the same on every host.
RUN groupadd --system --gid 10001 kizo \
    && useradd --system --uid 10001 --gid kizo --home-dir /var/lib/kizo --create-home \
        --shell /usr/sbin/nologin kizo
# Owned by root, read-only to the process: only KIZO_HOME (metrics files of the API's
# processes) is written.
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH \
    KIZO_HOME=/var/lib/kizo \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER kizo:kizo
WORKDIR /var/lib/kizo
ENTRYPOINT ["kizo"]
CMD ["--help"]
