"""The docker compose setup: `docker compose config -q` when a compose client is here, and
checks of deploy/ that always run (the TOML is a valid configuration whose DSNs name the
compose services, Prometheus scrapes the port the replicator serves).

No container engine is needed (none is available here): `docker compose config` only reads
and validates the files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc_sync.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
TOML = ROOT / "deploy" / "cdc-sync.toml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DOTENV = ROOT / ".env"
TOML_BUS = ROOT / "deploy" / "cdc-sync-bus.toml"
PROMETHEUS_BUS = ROOT / "deploy" / "prometheus-bus.yml"
PASSWORD_VAR = "CDC_SYNC_DB_PASSWORD"


def _compose_client() -> list[str] | None:
    """`docker compose` (the plugin), else a standalone `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True,
                               text=True, timeout=30, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _services(text: str) -> list[str]:
    """Top-level service names of the compose file (two-space keys under `services:`)."""
    block = text.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    return re.findall(r"^  ([a-z0-9_-]+):\s*$", block, re.M)


def test_compose_config_is_valid(tmp_path: Path) -> None:
    client = _compose_client()
    if client is None:
        pytest.skip("no `docker compose` plugin or `docker-compose` here to validate with")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
           PASSWORD_VAR: "not-a-real-password"}
    proc = subprocess.run([*client, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=60, env=env, cwd=str(ROOT), check=False)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([*client, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=60, env={**env, "COMPOSE_PROFILES": "bus"},
                          cwd=str(ROOT), check=False)
    assert proc.returncode == 0, proc.stderr
    # Without the password the file refuses to start (no default password anywhere).
    del env[PASSWORD_VAR]
    proc = subprocess.run([*client, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=60, env=env, cwd=str(ROOT), check=False)
    assert proc.returncode != 0
    assert PASSWORD_VAR in proc.stderr


def test_deploy_config_matches_the_compose_services() -> None:
    text = COMPOSE.read_text()
    services = _services(text)
    assert {"source", "site1", "site2", "init", "replicator", "prometheus"} <= set(services)
    settings = load_settings(TOML, environ={PASSWORD_VAR: "pw"})
    for dsn in [settings.source.dsn, *(s.dsn for s in settings.sites)]:
        parts = conninfo_to_dict(dsn)
        assert parts["host"] in services, dsn
        assert parts["password"] == "pw" and parts["port"] == "5432"
    assert [s.name for s in settings.sites] == ["site1", "site2"]
    # The password is never written down: only ${CDC_SYNC_DB_PASSWORD} references.
    assert "${" + PASSWORD_VAR in TOML.read_text()
    values = re.findall(r"^\s*(?:POSTGRES_PASSWORD|CDC_SYNC_DB_PASSWORD):\s*(.*)$", text, re.M)
    assert len(values) == 3 and all(v.startswith("${" + PASSWORD_VAR + ":?") for v in values)


def test_prometheus_scrapes_the_replicator_metrics_port() -> None:
    text = COMPOSE.read_text()
    command = re.search(r"^  replicator:\n(?:    .*\n|\n)*?    command: \[(.*)\]$", text, re.M)
    assert command, "replicator has no command list"
    args = [a.strip().strip('"') for a in command.group(1).split(",")]
    assert "run" in args
    port = args[args.index("--metrics-port") + 1]
    assert args[args.index("--metrics-host") + 1] == "0.0.0.0"  # reachable from prometheus
    targets = re.findall(r'targets:\s*\[\s*"([^"]+)"\s*\]', PROMETHEUS.read_text())
    assert targets == [f"replicator:{port}"]
    assert "wal_level=logical" in text and "track_commit_timestamp=on" in text
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml" in text
    assert "./deploy/cdc-sync.toml:" in text


def test_dockerfile_installs_the_package_with_cdc_sync_as_entrypoint() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.12-slim" in dockerfile
    # A build stage with a compiler makes the wheel (with the C decoder); the image installs it.
    build, image = dockerfile.split("\nFROM python:3.12-slim\n")
    assert "FROM python:3.12-slim AS build" in build and re.search(r"apt-get install .*\bgcc\b", build)
    assert re.search(r"^RUN pip wheel .*--wheel-dir /wheels \.$", build, re.M)
    assert "COPY --from=build /wheels /wheels" in image
    assert re.search(r"^RUN pip install /wheels/\*\.whl", image, re.M)
    assert 'ENTRYPOINT ["cdc-sync"]' in image
    # Everything building the wheel needs is copied (hatch force-includes migrations/ and runs
    # the build hook named in pyproject.toml).
    hook = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"]["wheel"]["hooks"]["custom"].get("path", "hatch_build.py")
    for needed in ("pyproject.toml", "README.md", hook, "cdc_sync", "migrations"):
        assert re.search(rf"^COPY .*\b{re.escape(needed)}\b", build, re.M), needed


def _command(text: str, service: str) -> list[str]:
    found = re.search(rf"^  {re.escape(service)}:\n(?:    .*\n|\n)*?    command: \[(.*)\]$",
                      text, re.M)
    assert found, f"{service} has no command list"
    return [a.strip().strip('"') for a in found.group(1).split(",")]


def _profile(text: str, service: str) -> str | None:
    block = re.search(rf"^  {re.escape(service)}:\n((?:    .*\n|\n)*)", text, re.M)
    assert block, service
    found = re.search(r'^    (?:<<: \*cdc-sync-bus|profiles: \["([a-z-]+)"\])$', block.group(1), re.M)
    if found is None:
        return None
    return found.group(1) or "bus"


def test_the_bus_profile_runs_capture_and_one_applier_per_site() -> None:
    """Profile "bus": nats, capture, an applier per site of deploy/cdc-sync-bus.toml and their
    Prometheus; the in-process replicator is profile "in-process", the default (.env), so the
    two never compete for the slot."""
    text = COMPOSE.read_text()
    services = _services(text)
    assert {"nats", "capture", "prometheus-bus"} <= set(services)
    assert re.search(r"^COMPOSE_PROFILES=in-process$", DOTENV.read_text(), re.M)
    assert _profile(text, "replicator") == _profile(text, "prometheus") == "in-process"
    for shared in ("source", "site1", "site2", "init"):
        assert _profile(text, shared) is None, shared
    assert "-js" in _command(text, "nats")
    settings = load_settings(TOML_BUS, environ={PASSWORD_VAR: "pw"})
    plain = load_settings(TOML, environ={PASSWORD_VAR: "pw"})
    assert settings.bus is not None and settings.bus.servers == ["nats://nats:4222"]
    assert settings.source == plain.source and settings.sites == plain.sites
    targets: list[str] = []
    capture = _command(text, "capture")
    assert capture[2] == "capture"
    targets.append(f"capture:{capture[capture.index('--metrics-port') + 1]}")
    for name in ("nats", "capture", "prometheus-bus"):
        assert _profile(text, name) == "bus", name
    for site in settings.sites:
        assert _profile(text, f"apply-{site.name}") == "bus"
        args = _command(text, f"apply-{site.name}")
        assert args[2:5] == ["apply", "--site", site.name]
        assert args[args.index("--metrics-host") + 1] == "0.0.0.0"
        targets.append(f"apply-{site.name}:{args[args.index('--metrics-port') + 1]}")
    scraped = [t for group in re.findall(r"targets:\s*\[([^\]]*)\]", PROMETHEUS_BUS.read_text())
               for t in re.findall(r'"([^"]+)"', group)]
    assert sorted(scraped) == sorted(targets)
    assert "./deploy/prometheus-bus.yml:/etc/prometheus/prometheus.yml" in text
    assert "./deploy/cdc-sync-bus.toml:/etc/cdc-sync/cdc-sync.toml:ro" in text
