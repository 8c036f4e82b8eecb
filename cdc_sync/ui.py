"""Rich renderables for the CLI: pure functions from plain data to tables and text.

Contract:
- `format_*` functions return `str`, `render_*` functions return Rich renderables (`Table`,
  `Group`, `Text`); none of them does I/O, reads a clock or touches a database. The CLI (and the
  demo) fetch the data, call these and print the result, so the same view is printed once
  (`status`), refreshed in place (`lag --watch`, `demo`) or tested as text.
- Inputs are the plain objects of `commands`: the `status --json` dict (site entries may also
  carry `dead_letters`, `conflicts`, `error`; the source may carry `warning`), the lists of
  `commands.conflicts` / `commands.dead_letters`, `commands.RetryReport`s (anything with
  `resolved` and `failed`), and `connectors.connector_status` dicts.
- Every string that comes from a database or an error goes into a `Text` (never Rich markup)
  after `mask_dsn`: a bracket in an error message prints as itself and no password shows.
- A value that is unknown (None) prints as an em dash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .errors import mask_dsn

__all__ = [
    "OfficeRow",
    "format_bytes",
    "format_office_line",
    "format_seconds",
    "format_ts",
    "render_conflicts",
    "render_connectors",
    "render_dead_letters",
    "render_offices",
    "render_retry",
    "render_sites",
    "render_source",
    "render_status",
]

NONE = "—"
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


class _Retry(Protocol):
    resolved: list[int]
    failed: dict[int, str]


# -- formatting ------------------------------------------------------------------------------

def format_bytes(value: int | float | None) -> str:
    """`1536` as `1.5 KiB`; bytes below 1 KiB exactly (`0 B`, `812 B`)."""
    if value is None:
        return NONE
    n = float(value)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_seconds(value: float | None) -> str:
    """`0.25` as `0.2 s`, `75` as `1m 15s`, `7300` as `2h 01m`."""
    if value is None:
        return NONE
    if value < 60:
        return f"{value:.1f} s"
    total = int(value)
    if total < 3600:
        return f"{total // 60}m {total % 60:02d}s"
    return f"{total // 3600}h {(total % 3600) // 60:02d}m"


def format_ts(value: str | None) -> str:
    """An ISO 8601 timestamp as `YYYY-MM-DD HH:MM:SS` (its own zone, as given); None as a dash."""
    if not value:
        return NONE
    date, sep, rest = value.partition("T")
    if not sep:
        return value
    return f"{date} {rest[:8]}"


def _count(value: Any) -> str:
    return NONE if value is None else str(value)


def _text(value: Any, style: str = "") -> Text:
    return Text(mask_dsn(" ".join(str(value).split())), style=style)


def _compact(value: Any, width: int = 60) -> str:
    if value is None:
        return NONE
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


# -- status and lag ----------------------------------------------------------------------------

def render_source(source: Mapping[str, Any]) -> Text:
    """One line about the source's slot, plus its retention warning on a second line."""
    line = Text()
    line.append("source ", style="bold")
    line.append(str(source.get("name", "?")), style="bold cyan")
    line.append(f"  slot {source.get('slot', '?')} ")
    if source.get("retained_bytes") is None and source.get("confirmed_flush_lsn") is None \
            and not source.get("active"):
        line.append("missing", style="bold red")
    elif source.get("active"):
        line.append("active", style="green")
    else:
        line.append("inactive", style="yellow")
    line.append(f"  current {source.get('current_lsn') or NONE}")
    line.append(f"  confirmed {source.get('confirmed_flush_lsn') or NONE}")
    line.append(f"  retained {format_bytes(source.get('retained_bytes'))}")
    if source.get("warning"):
        line.append("\n")
        line.append("warning: ", style="bold yellow")
        line.append_text(_text(source["warning"], "yellow"))
    return line


def render_sites(sites: Sequence[Mapping[str, Any]]) -> Table:
    """Per site: reachability, applied LSN, lag, last commit, conflicts, dead letters, error."""
    table = Table(title=None, expand=False, show_edge=True, header_style="bold")
    table.add_column("site", style="cyan", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("applied LSN", no_wrap=True)
    table.add_column("lag", justify="right", no_wrap=True)
    table.add_column("lag s", justify="right", no_wrap=True)
    table.add_column("last commit (UTC)", no_wrap=True)
    table.add_column("conflicts", justify="right")
    table.add_column("dead letters", justify="right")
    table.add_column("error", overflow="fold")
    for s in sites:
        reachable = bool(s.get("reachable"))
        if not reachable:
            state = Text("unreachable", style="bold red")
        elif s.get("lag_bytes") == 0:
            state = Text("in sync", style="green")
        elif s.get("applied_lsn") is None:
            state = Text("no snapshot", style="yellow")
        else:
            state = Text("catching up", style="yellow")
        dead = s.get("dead_letters")
        table.add_row(
            str(s.get("name", "?")),
            state,
            s.get("applied_lsn") or NONE,
            format_bytes(s.get("lag_bytes")),
            format_seconds(s.get("lag_seconds")),
            format_ts(s.get("last_commit_ts")),
            _count(s.get("conflicts")),
            Text(_count(dead), style="bold red" if dead else ""),
            _text(s["error"], "red") if s.get("error") else Text(""),
        )
    return table


def render_connectors(connectors: Sequence[Mapping[str, Any]]) -> Table:
    """Per connector: backlog, delivered position, last delivery, last error (and when)."""
    table = Table(header_style="bold")
    table.add_column("connector", style="cyan", no_wrap=True)
    table.add_column("backlog", justify="right")
    table.add_column("delivered seq", justify="right")
    table.add_column("last delivery (UTC)", no_wrap=True)
    table.add_column("last error", overflow="fold")
    for c in connectors:
        error = c.get("last_error")
        if c.get("error"):  # its state could not be read at all
            problem = _text(f"state unknown: {c['error']}", "bold red")
        elif error:
            problem = _text(f"{error} (at {format_ts(c.get('last_error_at'))})", "red")
        else:
            problem = Text("")
        table.add_row(
            str(c.get("name", "?")),
            Text(_count(c.get("backlog")), style="yellow" if c.get("backlog") else ""),
            _count(c.get("delivered_seq")),
            format_ts(c.get("last_delivery_at")),
            problem,
        )
    return table


def render_status(data: Mapping[str, Any],
                  connectors: Sequence[Mapping[str, Any]] | None = None, *,
                  connector_error: str | None = None, note: str | None = None) -> Group:
    """The `status` view: the source line, the sites table, the connectors table if any.

    `connectors` defaults to the status object's own `connectors` list (entries with an
    `error` key: their state could not be read). `connector_error` (a problem with all of
    them) and `note` (e.g. "refreshing every 2 s" or the error of the last refresh) are
    printed under the tables."""
    if connectors is None:
        connectors = data.get("connectors") or ()
    parts: list[RenderableType] = [render_source(data.get("source", {})),
                                   render_sites(data.get("sites", []))]
    if connectors:
        parts.append(render_connectors(connectors))
    bus = data.get("bus")
    if bus:
        parts.append(render_bus(bus))
    if connector_error:
        parts.append(Text.assemble(("connectors: ", "bold red"), _text(connector_error, "red")))
    if note:
        parts.append(_text(note, "dim"))
    return Group(*parts)


# -- conflicts and dead letters ----------------------------------------------------------------

def render_conflicts(rows: Sequence[Mapping[str, Any]]) -> RenderableType:
    """The conflict log (newest first, as `commands.conflicts` returns it)."""
    if not rows:
        return Text("no conflicts")
    table = Table(header_style="bold")
    for name, kw in (("site", {"style": "cyan", "no_wrap": True}), ("id", {"justify": "right"}),
                     ("detected (UTC)", {"no_wrap": True}), ("table", {}), ("kind", {}),
                     ("key", {"overflow": "fold"}), ("strategy", {}), ("outcome", {}),
                     ("from", {})):
        table.add_column(name, **kw)
    for r in rows:
        table.add_row(str(r.get("site", "?")), _count(r.get("id")), format_ts(r.get("detected_at")),
                      _text(r.get("table") or NONE), _text(r.get("kind") or NONE),
                      _text(_compact(r.get("key"), 40)), _text(r.get("strategy") or NONE),
                      _text(r.get("outcome") or NONE), _text(r.get("source") or NONE))
    return table


def render_dead_letters(rows: Sequence[Mapping[str, Any]]) -> RenderableType:
    """Changes the sites rejected (oldest first, as `commands.dead_letters` returns them)."""
    if not rows:
        return Text("no dead letters")
    table = Table(header_style="bold")
    for name, kw in (("site", {"style": "cyan", "no_wrap": True}), ("id", {"justify": "right"}),
                     ("created (UTC)", {"no_wrap": True}), ("table", {}), ("op", {}),
                     ("key", {"overflow": "fold"}), ("lsn", {"no_wrap": True}),
                     ("error", {"overflow": "fold"}), ("retried (UTC)", {})):
        table.add_column(name, **kw)
    for r in rows:
        error = r.get("error") or NONE
        if r.get("sqlstate"):
            error = f"[{r['sqlstate']}] {error}"
        table.add_row(str(r.get("site", "?")), _count(r.get("id")), format_ts(r.get("created_at")),
                      _text(r.get("table") or NONE), _text(r.get("op") or NONE),
                      _text(_compact(r.get("key"), 40)), r.get("lsn") or NONE,
                      _text(_compact(error, 80), "red"), format_ts(r.get("retried_at")))
    return table


def render_retry(reports: Mapping[str, _Retry]) -> RenderableType:
    """What `dead-letters retry` did per site: resolved ids and failures with their error."""
    if not any(r.resolved or r.failed for r in reports.values()):
        return Text("no dead letters to retry")
    table = Table(header_style="bold")
    table.add_column("site", style="cyan", no_wrap=True)
    table.add_column("id", justify="right")
    table.add_column("result", overflow="fold")
    for site, report in reports.items():
        for dl_id in report.resolved:
            table.add_row(site, str(dl_id), Text("resolved", style="green"))
        for dl_id, error in report.failed.items():
            table.add_row(site, str(dl_id), _text(f"failed: {error}", "red"))
    return table


# -- the demo ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OfficeRow:
    """One office of the demo, as its view shows it.

    `lag_bytes`/`lag_seconds`: how far the other offices are behind this office's own changes
    (the worst of them); `changes_per_second`: changes applied *at* this office from the others
    over the last refresh interval; `conflicts`/`dead_letters`: resolved/set aside at it."""

    name: str
    writes: int
    lag_bytes: int | None
    lag_seconds: float | None
    changes_per_second: float
    applied: int
    conflicts: int
    dead_letters: int
    connected: bool
    error: str | None = None


def render_offices(rows: Sequence[OfficeRow], *, elapsed: float, title: str = "cdc-sync demo",
                   footer: str | None = None) -> Table:
    """The demo's live table, one row per office."""
    table = Table(title=f"{title} — {format_seconds(elapsed)}", header_style="bold",
                  caption=footer, caption_justify="left")
    table.add_column("office", style="cyan", no_wrap=True)
    table.add_column("writes", justify="right")
    table.add_column("lag out", justify="right", no_wrap=True)
    table.add_column("lag out s", justify="right", no_wrap=True)
    table.add_column("applied in/s", justify="right")
    table.add_column("applied in", justify="right")
    table.add_column("conflicts", justify="right")
    table.add_column("dead letters", justify="right")
    table.add_column("state")
    for r in rows:
        state = (Text("streaming", style="green") if r.connected and not r.error
                 else _text(r.error or "connecting", "yellow"))
        table.add_row(r.name, str(r.writes), format_bytes(r.lag_bytes),
                      format_seconds(r.lag_seconds), f"{r.changes_per_second:.0f}",
                      str(r.applied), str(r.conflicts),
                      Text(str(r.dead_letters), style="bold red" if r.dead_letters else ""),
                      state)
    return table


def format_office_line(rows: Sequence[OfficeRow], *, elapsed: float) -> str:
    """The demo's plain progress line (no terminal): one segment per office."""
    parts = [f"{r.name}: {r.writes} writes, lag {format_bytes(r.lag_bytes)}/"
             f"{format_seconds(r.lag_seconds)}, {r.changes_per_second:.0f} changes/s, "
             f"{r.conflicts} conflicts, {r.dead_letters} dead letters" for r in rows]
    return f"[{elapsed:5.1f}s] " + " | ".join(parts)


def render_bus(bus: Mapping[str, Any]) -> Text:
    """One line for the stream, then one per site: pending messages or "needs resync"."""
    if not bus.get("reachable"):
        return Text.assemble(("bus: ", "bold"), _text(f"stream {bus.get('stream')}: "
                                                     f"{bus.get('error') or 'unreachable'}", "red"))
    text = Text.assemble(("bus: ", "bold"), f"stream {bus['stream']}, {bus['messages']} messages, "
                         f"{bus['bytes']} bytes, seq {bus['first_seq']}..{bus['last_seq']}")
    for site in bus.get("sites", ()):
        if site.get("needs_resync"):
            text.append(f"\n  {site['name']}: ")
            text.append("needs resync (run cdc-sync init)", "bold red")
        else:
            text.append(f"\n  {site['name']}: {site.get('pending_messages')} pending")
    return text
