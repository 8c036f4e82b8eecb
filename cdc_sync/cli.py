"""`cdc-sync`: a thin Typer/Rich layer over `commands`, `metrics`, `demo` and `ui`.

Contract (the commands and options are those of ARCHITECTURE.md):
- Global options before the command: `--debug`, `--log-level DEBUG|INFO|WARNING|ERROR`,
  `--log-format human|json`. Every command that reads a configuration takes `-c/--config FILE`
  (default `$CDC_SYNC_CONFIG`, else `./cdc-sync.toml`).
- Results go to stdout (`--json` output is exactly one JSON document); progress, logs and
  errors go to stderr.
- Every error, whatever raised it (a `CdcSyncError`, a database or OS error, a usage error,
  an unexpected exception), ends the process with a non-zero status and exactly one line
  `error: ...` on stderr, passed through `mask_dsn` (no password) and without a traceback;
  `--debug` re-raises instead. Usage errors exit 2, Ctrl-C 130, everything else 1.
  `dead-letters retry` exits 1 when some dead letter could not be re-applied.
- Views come from `ui` (pure renderables); `lag --watch` and `demo` refresh them in place on a
  terminal (Rich Live) and print plain output otherwise.
"""

# No `from __future__ import annotations` here: Typer reads every command's signature each
# time the CLI starts, and string annotations cost it an eval each (~4 ms of every command).
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import psycopg
import typer
from rich.console import Console, Group, RenderableType
from rich.text import Text
from typer.exceptions import TyperException

from . import commands
from .config import Settings, load_settings
from .errors import CdcSyncError, mask_dsn
from .logs import setup_logging
from .protocol import ProtocolError

if TYPE_CHECKING:  # rich's progress bars and live views are imported by what shows them
    from rich.progress import ProgressColumn, TaskID

    from .metrics import Metrics

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PostgreSQL change-data-capture: one source, many sites, exactly once.")
dead_letters_app = typer.Typer(help="Changes a site rejected: list them, or retry them.")
app.add_typer(dead_letters_app, name="dead-letters")

out = Console()
err = Console(stderr=True)

_state: dict[str, Any] = {"debug": False, "log_level_given": False}

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file "
                      "(default: $CDC_SYNC_CONFIG or ./cdc-sync.toml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
SiteOpt = Annotated[str | None, typer.Option("--site", help="only this site")]
T = TypeVar("T")


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(StrEnum):
    human = "human"
    json = "json"


# -- errors ------------------------------------------------------------------------------------

def _one_line(text: str) -> str:
    return mask_dsn(" ".join(text.split()))


def _print_line(console: Console, text: str, *, soft_wrap: bool | None = None) -> None:
    """Print `text` as it is (no markup, no highlighting). Rich replaces emoji codes
    (`:name:`) as ever; a line without two colons cannot hold one, so it skips that lookup
    (the first one loads Rich's emoji table: ~10 ms of `init`'s wall time)."""
    console.print(text, markup=False, highlight=False, soft_wrap=soft_wrap,
                  emoji=None if text.count(":") > 1 else False)


def _fail(message: str, code: int = 1) -> NoReturn:
    _print_line(err, f"error: {_one_line(message)}", soft_wrap=True)
    raise typer.Exit(code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CdcSyncError | ProtocolError):
        return str(exc)
    if isinstance(exc, psycopg.Error):
        return f"database error: {exc}"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        if _state["debug"]:
            raise
        _fail(_describe(exc))


def _settings(config: Path | None) -> Settings:
    return _guard(lambda: load_settings(config))


PIPE_WIDTH = 200  # tables printed to a pipe or file: wide rather than truncated


def _show(renderable: RenderableType) -> None:
    """Print a view on stdout: as wide as the terminal, or (not a terminal, no $COLUMNS)
    `PIPE_WIDTH` columns."""
    if not out.is_terminal and "COLUMNS" not in os.environ and out.width < PIPE_WIDTH:
        out.width = PIPE_WIDTH
    out.print(renderable)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


# -- global options ----------------------------------------------------------------------------

class _CurrentStderr:
    """Log lines go to whatever `sys.stderr` is when they are written: while a Rich live view
    (progress bars, `lag --watch`, the demo) is on screen that is its proxy, which prints them
    above the view instead of through it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    log_level: Annotated[LogLevel | None, typer.Option(
        "--log-level", case_sensitive=False,
        help="log level (default: INFO for run, WARNING otherwise)")] = None,
    log_format: Annotated[LogFormat, typer.Option(
        "--log-format", case_sensitive=False, help="log lines: human or json")] = LogFormat.human,
) -> None:
    _state["debug"] = debug
    _state["log_level_given"] = log_level is not None
    # One-shot commands stay quiet (an error is then the only line on stderr); `run` raises
    # the default to INFO for itself.
    level = log_level.value if log_level is not None else ("DEBUG" if debug else "WARNING")
    setup_logging(level=level, fmt=log_format.value)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(_CurrentStderr())
    if level != "DEBUG":  # alembic narrates every migration step at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)


# -- init --------------------------------------------------------------------------------------

def _rate_column() -> "ProgressColumn":
    """A column of rows copied and rows per second."""
    from rich.progress import ProgressColumn, Task

    class _RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.speed
            if task.finished or not task.started or speed is None:
                elapsed = task.elapsed
                speed = task.completed / elapsed if elapsed else None
            rate = f"{speed:,.0f} rows/s" if speed else "… rows/s"
            return Text(f"{int(task.completed):,} rows  {rate}")

    return _RateColumn()


class _CopyProgress:
    """One Rich progress bar per (site, table) while `init` copies the snapshot."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(finished_text="✓"),
                                 TextColumn("{task.description}"), BarColumn(),
                                 _rate_column(), TimeElapsedColumn(), console=console,
                                 transient=False)
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.current: dict[str, TaskID] = {}  # site -> the table it is copying

    def __call__(self, site: str, table: str, rows: int) -> None:
        key = (site, table)
        task = self.tasks.get(key)
        if task is None:
            previous = self.current.get(site)
            if previous is not None:
                self._finish(previous)
            task = self.progress.add_task(f"{site}: {table}", total=None)
            self.tasks[key] = task
            self.current[site] = task
        self.progress.advance(task, rows)

    def _finish(self, task: "TaskID") -> None:
        done = next((t.completed for t in self.progress.tasks if t.id == task), 0)
        self.progress.update(task, total=done or 1, completed=done or 1)
        self.progress.stop_task(task)

    def finish_all(self) -> None:
        for task in self.current.values():
            self._finish(task)


@app.command()
def init(config: ConfigOpt = None) -> None:
    """Check the source, create publication and slot, prepare and copy every site."""
    settings = _settings(config)
    if err.is_terminal:
        bars = _CopyProgress(err)
        with bars.progress:
            report = _guard(lambda: commands.init(settings, on_progress=bars))
            bars.finish_all()
    else:
        report = _guard(lambda: commands.init(settings))
    _print_line(out, f"source {settings.source.name}: {len(report.tables)} tables published"
                + (f", slot {settings.source.slot} created" if report.slot_created else ""))
    for site in settings.sites:
        created = report.created_tables.get(site.name, [])
        copied = report.copied.get(site.name)
        line = f"site {site.name}: ready"
        if created:
            line += f", created {len(created)} tables"
        if copied is not None:
            line += f", copied {copied} rows at {report.snapshot_lsn}"
        _print_line(out, line)


# -- run ---------------------------------------------------------------------------------------

@app.command()
def run(
    config: ConfigOpt = None,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=0, max=65535,
        help="serve Prometheus metrics on this port (/metrics)")] = None,
    metrics_host: Annotated[str, typer.Option(
        "--metrics-host", help="address the metrics endpoint listens on")] = "127.0.0.1",
) -> None:
    """Stream changes to every site until SIGINT/SIGTERM."""
    if not _state["log_level_given"] and not _state["debug"]:
        logging.getLogger().setLevel(logging.INFO)
    settings = _settings(config)
    if metrics_port is None:
        _guard(lambda: commands.run(settings))
        return
    if settings.bus is not None:
        _with_metrics(metrics_port, metrics_host,
                      lambda m: commands.run_bus(settings, metrics=m))
        return
    from .metrics import Metrics, serve_metrics
    from .pipeline import Pipeline

    metrics = Metrics()
    pipeline = Pipeline(settings, on_applied=metrics.on_applied)
    connectors = _connector_status_fn(settings)
    try:
        server = serve_metrics(pipeline, metrics_port, metrics_host, metrics=metrics,
                               connectors=connectors)
    except OSError as exc:
        if _state["debug"]:
            raise
        _fail(f"metrics: cannot listen on {metrics_host}:{metrics_port}: "
              f"{exc.strerror or exc}")
    try:
        _guard(lambda: commands.run(settings, pipeline=pipeline))
    finally:
        server.close()


def _with_metrics(port: int | None, host: str, verb: Callable[["Metrics | None"], None]) -> None:
    """Run `verb` with a `Metrics` served on host:port (or with None when no port)."""
    if port is None:
        _guard(lambda: verb(None))
        return
    from .metrics import Metrics, serve_registry

    metrics = Metrics()
    try:
        server = serve_registry(metrics, port, host)
    except OSError as exc:
        if _state["debug"]:
            raise
        _fail(f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}")
    try:
        _guard(lambda: verb(metrics))
    finally:
        server.close()


MetricsPortOpt = Annotated[int | None, typer.Option(
    "--metrics-port", min=0, max=65535, help="serve Prometheus metrics on this port (/metrics)")]
MetricsHostOpt = Annotated[str, typer.Option(
    "--metrics-host", help="address the metrics endpoint listens on")]


@app.command()
def capture(config: ConfigOpt = None, metrics_port: MetricsPortOpt = None,
            metrics_host: MetricsHostOpt = "127.0.0.1") -> None:
    """Read the slot into the bus (the configuration's bus section) until SIGINT/SIGTERM;
    sites apply with `apply`."""
    if not _state["log_level_given"] and not _state["debug"]:
        logging.getLogger().setLevel(logging.INFO)
    settings = _settings(config)
    _with_metrics(metrics_port, metrics_host,
                  lambda m: commands.capture(settings, metrics=m))


@app.command("apply")
def apply_cmd(
    config: ConfigOpt = None,
    site: Annotated[list[str] | None, typer.Option(
        "--site", help="a site to apply to (repeatable; default: every site in the file)")] = None,
    metrics_port: MetricsPortOpt = None,
    metrics_host: MetricsHostOpt = "127.0.0.1",
) -> None:
    """Apply the bus (the configuration's bus section) to sites until SIGINT/SIGTERM."""
    if not _state["log_level_given"] and not _state["debug"]:
        logging.getLogger().setLevel(logging.INFO)
    settings = _settings(config)
    _with_metrics(metrics_port, metrics_host,
                  lambda m: commands.apply(settings, site or None, metrics=m))


def _connector_status_fn(settings: Settings) -> Callable[[], list[dict[str, Any]]] | None:
    if not settings.connectors:
        return None
    from .connectors import connector_status

    return lambda: connector_status(settings)


# -- status and lag ----------------------------------------------------------------------------

def _status_view(settings: Settings, note: str | None = None) -> RenderableType:
    from .ui import render_status

    return render_status(commands.status(settings), note=note)


@app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The source's slot and every site's position and lag."""
    settings = _settings(config)
    if as_json:
        _print_json(_guard(lambda: commands.status(settings)))
        return
    _show(_guard(lambda: _status_view(settings)))


@app.command()
def lag(
    config: ConfigOpt = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh in place until Ctrl-C")]
    = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="seconds between "
                                            "refreshes with --watch")] = 2.0,
) -> None:
    """Every site's position and lag; with --watch a live table refreshing in place."""
    settings = _settings(config)
    if not watch:
        _show(_guard(lambda: _status_view(settings)))
        return
    first = _guard(lambda: _status_view(settings, note=_refresh_note(interval)))
    if out.is_terminal:
        _watch_live(settings, first, interval)
    else:
        _watch_plain(settings, first, interval)


def _wait(seconds: float) -> None:
    time.sleep(seconds)


def _refresh_note(interval: float, problem: str | None = None) -> str:
    stamp = time.strftime("%H:%M:%S")
    note = f"{stamp}  refreshing every {interval:g} s (Ctrl-C to stop)"
    return f"{note}  last refresh failed: {problem}" if problem else note


def _refresh(settings: Settings, last: RenderableType, interval: float) -> RenderableType:
    try:
        return _status_view(settings, note=_refresh_note(interval))
    except Exception as exc:  # keep watching: the source may be restarting
        if _state["debug"]:
            raise
        stale = last.renderables[:-1] if isinstance(last, Group) else [last]
        return Group(*stale, Text(_refresh_note(interval, _one_line(_describe(exc))),
                                  style="red"))


def _watch_live(settings: Settings, first: RenderableType, interval: float) -> None:
    from rich.live import Live

    view = first
    try:
        with Live(view, console=out, auto_refresh=False, transient=False) as screen:
            while True:
                _wait(interval)
                view = _refresh(settings, view, interval)
                screen.update(view, refresh=True)
    except KeyboardInterrupt:
        return


def _watch_plain(settings: Settings, first: RenderableType, interval: float) -> None:
    view = first
    try:
        while True:
            _show(view)
            sys.stdout.flush()
            _wait(interval)
            view = _refresh(settings, view, interval)
    except KeyboardInterrupt:
        return


# -- conflicts and dead letters ----------------------------------------------------------------

@app.command()
def conflicts(
    config: ConfigOpt = None, site: SiteOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="newest N per site")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The conflict log of the sites (newest first)."""
    from .ui import render_conflicts

    settings = _settings(config)
    rows = _guard(lambda: commands.conflicts(settings, site=site, limit=limit))
    if as_json:
        _print_json(rows)
    else:
        _show(render_conflicts(rows))


@dead_letters_app.callback(invoke_without_command=True)
def dead_letters(ctx: typer.Context, config: ConfigOpt = None, site: SiteOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Changes a site rejected and set aside (without a subcommand: list them)."""
    ctx.obj = {"config": config, "site": site, "json": as_json}
    if ctx.invoked_subcommand is not None:
        return
    from .ui import render_dead_letters

    settings = _settings(config)
    rows = _guard(lambda: commands.dead_letters(settings, site=site))
    if as_json:
        _print_json(rows)
    else:
        _show(render_dead_letters(rows))


@dead_letters_app.command("retry")
def dead_letters_retry(
    ctx: typer.Context, config: ConfigOpt = None, site: SiteOpt = None,
    ids: Annotated[list[int] | None, typer.Option("--id", help="only this dead letter "
                                                  "(repeatable)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-apply dead letters from the source's current rows (the newest state wins)."""
    from .ui import render_retry

    parent: Mapping[str, Any] = ctx.obj or {}
    settings = _settings(config or parent.get("config"))
    site = site or parent.get("site")
    as_json = as_json or bool(parent.get("json"))
    reports = _guard(lambda: commands.retry_dead_letters(settings, site=site,
                                                          ids=list(ids) if ids else None))
    if as_json:
        _print_json({name: {"resolved": r.resolved,
                            "failed": {str(k): v for k, v in r.failed.items()}}
                     for name, r in reports.items()})
    else:
        _show(render_retry(reports))
    failed = [(name, dl_id) for name, r in reports.items() for dl_id in r.failed]
    if failed:
        what = ", ".join(f"{name} #{dl_id}" for name, dl_id in failed)
        _fail(f"{len(failed)} dead letter{'s' if len(failed) != 1 else ''} could not be "
              f"re-applied: {what}")


# -- teardown, demo ----------------------------------------------------------------------------

@app.command()
def teardown(config: ConfigOpt = None) -> None:
    """Drop the replication slot and the publication."""
    settings = _settings(config)
    dropped = _guard(lambda: commands.teardown(settings))
    _print_line(out, "dropped " + (", ".join(dropped) if dropped else "nothing"))


@app.command()
def demo(
    seconds: Annotated[float | None, typer.Option(
        "--seconds", min=1, help="stop the writers after N seconds (default: at Ctrl-C)")] = None,
) -> None:
    """Three offices in multi-directional sync on a PostgreSQL of their own, live."""
    from .demo import run_demo

    if not _state["log_level_given"] and not _state["debug"]:
        logging.getLogger().setLevel(logging.WARNING)  # the live view is the output
    result = _guard(lambda: run_demo(seconds, console=out))
    if not result.ok:
        _fail("demo failed: " + (result.problems[0] if result.problems else "see the summary"))


# -- entry point -------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI; usage errors become one `error:` line too (exit 2).

    Without `argv` (the `cdc-sync` script, `python -m cdc_sync`) the process is the CLI's own:
    every object its imports made is moved out of the cyclic garbage collector's sight
    (`gc.freeze`), so neither the collections while the command runs nor the interpreter's
    exit walk them again (about 0.1 s of every command's wall time, measured on `init`).
    """
    if argv is None:
        gc.freeze()
    try:
        code = app(args=list(argv) if argv is not None else None, prog_name="cdc-sync",
                   standalone_mode=False)
    except typer.Abort:
        code = 130
    except KeyboardInterrupt:
        code = 130
    except TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stderr.write(exc.format_message() + "\n")
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        _print_line(err, f"error: {where}{_one_line(exc.format_message())}{hint}",
                    soft_wrap=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if _state["debug"]:
            raise
        _print_line(err, f"error: {_one_line(_describe(exc))}", soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

if __name__ == "__main__":
    main()
