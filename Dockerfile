# cdc-sync as a container: `docker build -t cdc-sync .`, then `docker run cdc-sync --help`.
# The entry point is the `cdc-sync` command; pass a command and `-c FILE` (or set
# CDC_SYNC_CONFIG) and mount the configuration file. See docker-compose.yml for a whole setup.

# Build stage: a C compiler, so the wheel gets the C decoder (cdc_sync/protocol/_speedups.c).
FROM python:3.12-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md hatch_build.py ./
COPY cdc_sync ./cdc_sync
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels

# Run unprivileged: cdc-sync needs no root, only network access to the databases.
RUN useradd --system --uid 10001 --no-create-home cdcsync
USER cdcsync
WORKDIR /home/cdcsync

EXPOSE 9108
ENTRYPOINT ["cdc-sync"]
CMD ["--help"]
