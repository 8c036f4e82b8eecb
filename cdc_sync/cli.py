"""`cdc-sync`: a thin Typer/Rich layer over `commands`.

Every `CdcSyncError` (and `ProtocolError`) is caught once here and printed as one line on
stderr with a non-zero exit status; `--debug` re-raises with the traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from . import commands
from .config import Settings, load_settings
from .errors import CdcSyncError, mask_dsn
from .logs import setup_logging
from .protocol import ProtocolError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="PostgreSQL change-data-capture: one source, many sites, exactly once.")
out = Console()
err = Console(stderr=True)

_state: dict[str, Any] = {"debug": False}

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file "
                      "(default: $CDC_SYNC_CONFIG or ./cdc-sync.toml)")]
T = TypeVar("T")


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (CdcSyncError, ProtocolError) as exc:
        if _state["debug"]:
            raise
        err.print(f"error: {mask_dsn(str(exc))}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _settings(config: Path | None) -> Settings:
    return _guard(lambda: load_settings(config))


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")] = "INFO",
    log_format: Annotated[str, typer.Option("--log-format", help="human or json")] = "human",
) -> None:
    _state["debug"] = debug
    setup_logging(level=log_level, fmt=log_format)


@app.command()
def init(config: ConfigOpt = None) -> None:
    """Check the source, create publication and slot, prepare and copy every site."""
    settings = _settings(config)
    report = _guard(lambda: commands.init(settings))
    out.print(f"source {settings.source.name}: {len(report.tables)} tables published"
              + (f", slot {settings.source.slot} created" if report.slot_created else ""))
    for site in settings.sites:
        created = report.created_tables.get(site.name, [])
        copied = report.copied.get(site.name)
        line = f"site {site.name}: ready"
        if created:
            line += f", created {len(created)} tables"
        if copied is not None:
            line += f", copied {copied} rows at {report.snapshot_lsn}"
        out.print(line)


@app.command()
def run(config: ConfigOpt = None) -> None:
    """Stream changes to every site until SIGINT/SIGTERM."""
    settings = _settings(config)
    _guard(lambda: commands.run(settings))


@app.command()
def status(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """The source's slot and every site's position and lag."""
    settings = _settings(config)
    data = _guard(lambda: commands.status(settings))
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    src = data["source"]
    out.print(f"source {src['name']}: slot {src['slot']} "
              f"{'active' if src['active'] else 'inactive'}, current {src['current_lsn']}, "
              f"confirmed {src['confirmed_flush_lsn']}, retained {src['retained_bytes']} bytes")
    for s in data["sites"]:
        if not s["reachable"]:
            out.print(f"site {s['name']}: unreachable ({s.get('error', '')})", markup=False)
        else:
            out.print(f"site {s['name']}: applied {s['applied_lsn']}, lag {s['lag_bytes']} bytes"
                      f" / {s['lag_seconds']} s, last commit {s['last_commit_ts']}")


@app.command()
def teardown(config: ConfigOpt = None) -> None:
    """Drop the replication slot and the publication."""
    settings = _settings(config)
    dropped = _guard(lambda: commands.teardown(settings))
    out.print("dropped " + (", ".join(dropped) if dropped else "nothing"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
