# cdc-sync as a container: `docker build -t cdc-sync .`, then `docker run cdc-sync --help`.
# The entry point is the `cdc-sync` command; pass a command and `-c FILE` (or set
# CDC_SYNC_CONFIG) and mount the configuration file. See docker-compose.yml for a whole setup.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY cdc_sync ./cdc_sync
COPY migrations ./migrations
RUN pip install . && rm -rf /src

# Run unprivileged: cdc-sync needs no root, only network access to the databases.
RUN useradd --system --uid 10001 --no-create-home cdcsync
USER cdcsync
WORKDIR /home/cdcsync

EXPOSE 9108
ENTRYPOINT ["cdc-sync"]
CMD ["--help"]
