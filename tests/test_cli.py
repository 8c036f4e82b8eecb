"""The `cdc-sync` command line: views (`ui`), error lines, and every command on real databases.

Most tests call `cli.main(argv)` in-process (a subprocess costs seconds of imports on this
machine) and read stdout/stderr from `capsys`; one test runs `python -m cdc_sync` to check the
real exit status and stderr of a failing command.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration.helpers import (
    execute,
    make_settings,
    run_cli,
    running_pipeline,
    scalar,
    settings_dict,
    table_fingerprint,
    wait_until_caught_up,
    write_config,
)
from rich.console import Console

from cdc_sync import cli, ui
from cdc_sync.errors import CdcSyncError

SECRET = "s3cr3t-pw"


# -- helpers -----------------------------------------------------------------------------------

@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def invoke(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., Result]]:
    """Run `cdc-sync ARGS` in-process; restores logging and the CLI's state afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    state = dict(cli._state)

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)
    cli._state.clear()
    cli._state.update(state)


def render(renderable: Any, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


def assert_one_error_line(result: Result, *fragments: str) -> None:
    lines = result.err.strip().splitlines()
    assert result.code != 0
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    assert SECRET not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- ui: pure views ----------------------------------------------------------------------------

def test_formatters() -> None:
    assert ui.format_bytes(None) == "—"
    assert ui.format_bytes(0) == "0 B"
    assert ui.format_bytes(812) == "812 B"
    assert ui.format_bytes(1536) == "1.5 KiB"
    assert ui.format_bytes(3 * 1024**3) == "3.0 GiB"
    assert ui.format_seconds(None) == "—"
    assert ui.format_seconds(0.25) == "0.2 s"
    assert ui.format_seconds(75) == "1m 15s"
    assert ui.format_seconds(7300) == "2h 01m"
    assert ui.format_ts("2026-11-28T12:00:00.123+00:00") == "2026-11-28 12:00:00"
    assert ui.format_ts(None) == "—"


STATUS = {
    "source": {"name": "washington", "slot": "cdc_sync", "active": True,
               "current_lsn": "0/1A2B3C4", "confirmed_flush_lsn": "0/1A2B000",
               "retained_bytes": 3 * 1024**3,
               "warning": "slot retains 3221225472 bytes of WAL, over max_retained_bytes "
                          "1073741824; held back by site tokyo"},
    "sites": [
        {"name": "berlin", "reachable": True, "applied_lsn": "0/1A2B3C4", "lag_bytes": 0,
         "lag_seconds": 0.0, "last_commit_ts": "2026-11-28T12:00:00.123+00:00",
         "conflicts": 4, "dead_letters": 0},
        {"name": "tokyo", "reachable": True, "applied_lsn": "0/1A00000", "lag_bytes": 2048,
         "lag_seconds": 95.0, "last_commit_ts": "2026-11-28T11:58:25.000+00:00",
         "conflicts": 0, "dead_letters": 2},
        {"name": "paris", "reachable": False, "applied_lsn": None, "lag_bytes": None,
         "lag_seconds": None, "last_commit_ts": None,
         "error": f"site paris: connection refused [postgresql://u:{SECRET}@paris:5432/db]"},
    ],
}


def test_render_status_shows_slot_sites_and_connectors() -> None:
    connectors = [{"name": "audit", "backlog": 17, "delivered_seq": 120,
                   "last_error": "HTTP 503 from https://example.org/hook",
                   "last_error_at": "2026-11-28T12:01:00+00:00",
                   "last_delivery_at": "2026-11-28T12:00:30+00:00"}]
    text = render(ui.render_status(STATUS, connectors))
    assert "washington" in text and "slot cdc_sync active" in text
    assert "retained 3.0 GiB" in text
    assert "warning: slot retains 3221225472 bytes" in text and "held back by site tokyo" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines()
            if line.startswith("│") and line.split("│")[1].strip() in ("berlin", "tokyo", "paris")}
    assert "in sync" in rows["berlin"] and "0 B" in rows["berlin"] and "4" in rows["berlin"]
    assert "catching up" in rows["tokyo"] and "2.0 KiB" in rows["tokyo"]
    assert "1m 35s" in rows["tokyo"] and "2026-11-28 11:58:25" in rows["tokyo"]
    assert "unreachable" in rows["paris"]
    assert "[postgresql://u:***@paris:5432/db]" in text  # brackets print as themselves
    assert SECRET not in text
    assert "audit" in text and "17" in text and "HTTP 503" in text


def test_render_status_takes_connectors_from_the_status_object() -> None:
    data = {**STATUS, "connectors": [
        {"name": "audit", "backlog": 3, "delivered_seq": 9, "last_error": None,
         "last_error_at": None, "last_delivery_at": "2026-11-28T12:00:30+00:00"},
        {"name": "crm", "error": "outbox site berlin (db:5432/x): connection refused"}]}
    text = render(ui.render_status(data))
    audit = next(line for line in text.splitlines() if "│ audit" in line)
    assert "3" in audit and "9" in audit and "2026-11-28 12:00:30" in audit
    assert "state unknown: outbox site berlin (db:5432/x): connection refused" in text


def test_render_status_connector_error_and_note() -> None:
    text = render(ui.render_status(STATUS, connector_error="outbox site berlin: timeout",
                                   note="12:00:00  refreshing every 2 s"))
    assert "connectors: outbox site berlin: timeout" in text
    assert "refreshing every 2 s" in text


def test_render_conflicts_dead_letters_and_retry() -> None:
    assert "no conflicts" in render(ui.render_conflicts([]))
    assert "no dead letters" in render(ui.render_dead_letters([]))
    text = render(ui.render_conflicts([{
        "site": "berlin", "id": 7, "source": "washington", "table": "public.grants",
        "kind": "update_update", "key": {"id": 3}, "strategy": "lww", "outcome": "incoming_wins",
        "detected_at": "2026-11-28T12:00:00+00:00"}]))
    assert "berlin" in text and "update_update" in text and '{"id": 3}' in text
    text = render(ui.render_dead_letters([{
        "site": "tokyo", "id": 3, "table": "public.item", "op": "insert", "key": {"id": 1501},
        "lsn": "0/16B3F20", "error": 'new row violates check constraint "qty_ok"',
        "sqlstate": "23514", "created_at": "2026-11-28T12:00:00+00:00", "retried_at": None}]))
    assert "[23514]" in text and "qty_ok" in text and "0/16B3F20" in text

    @dataclass
    class Report:
        resolved: list[int]
        failed: dict[int, str]

    text = render(ui.render_retry({"tokyo": Report([3], {4: "still violates qty_ok"})}))
    assert re.search(r"tokyo\s*│\s*3\s*│\s*resolved", text)
    assert "failed: still violates qty_ok" in text
    assert "no dead letters to retry" in render(ui.render_retry({"tokyo": Report([], {})}))


def test_render_offices_and_plain_line() -> None:
    rows = [ui.OfficeRow("washington", 120, 0, 0.0, 41.5, 230, 3, 0, True),
            ui.OfficeRow("berlin", 99, 2048, 1.5, 12.0, 200, 1, 2, False, "connection lost")]
    text = render(ui.render_offices(rows, elapsed=12.0, footer="Ctrl-C to stop"))
    assert "washington" in text and "streaming" in text and "connection lost" in text
    assert "12.0 s" in text and "Ctrl-C to stop" in text
    line = ui.format_office_line(rows, elapsed=4.0)
    assert line.startswith("[  4.0s] washington: 120 writes, lag 0 B/0.0 s, 42 changes/s")
    assert "berlin: 99 writes, lag 2.0 KiB/1.5 s" in line and "2 dead letters" in line
    assert "\n" not in line


# -- errors: one line, no traceback, no password -----------------------------------------------

def test_missing_config_is_one_line(invoke: Callable[..., Result], tmp_path: Path) -> None:
    result = invoke("status", "-c", str(tmp_path / "nope.toml"))
    assert result.code == 1
    assert_one_error_line(result, "config file not found", "nope.toml")


def test_config_from_environment(invoke: Callable[..., Result], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_SYNC_CONFIG", str(tmp_path / "from-env.toml"))
    assert_one_error_line(invoke("conflicts"), "from-env.toml")


def test_usage_errors_are_one_line(invoke: Callable[..., Result]) -> None:
    result = invoke("status", "--nope")
    assert result.code == 2
    assert_one_error_line(result, "No such option: --nope")
    result = invoke("--log-level", "loud", "status")
    assert result.code == 2
    assert_one_error_line(result, "--log-level")
    result = invoke("conflicts", "--limit", "zero")
    assert result.code == 2
    assert_one_error_line(result, "--limit")


def test_unreachable_source_hides_the_password(invoke: Callable[..., Result],
                                               tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dsn = f"postgresql://alice:{SECRET}@127.0.0.1:{port}/db?connect_timeout=2"
    config = write_config(tmp_path / "c.toml", {"source": {"name": "hq", "dsn": dsn},
                                                "sites": [{"name": "s1", "dsn": dsn}]})
    for args in (["status"], ["status", "--json"], ["lag"], ["init"], ["teardown"]):
        result = invoke(*args, "-c", str(config))
        assert result.code == 1, (args, result)
        assert_one_error_line(result, f"127.0.0.1:{port}")
        assert result.out == ""


def test_debug_reraises(invoke: Callable[..., Result], tmp_path: Path) -> None:
    with pytest.raises(CdcSyncError, match="config file not found"):
        invoke("--debug", "status", "-c", str(tmp_path / "nope.toml"))


def test_unexpected_exception_is_one_line(invoke: Callable[..., Result], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise ValueError(f"bad value in postgresql://u:{SECRET}@h/db")

    monkeypatch.setattr(cli, "load_settings", boom)
    result = invoke("status")
    assert result.code == 1
    assert_one_error_line(result, "unexpected ValueError", "postgresql://u:***@h/db", "--debug")


def test_process_exit_status_and_stderr(tmp_path: Path) -> None:
    proc = run_cli("conflicts", "-c", str(tmp_path / "missing.toml"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: config file not found")


# -- the commands on real databases ------------------------------------------------------------

def _text_key(key: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in key.items()}


GRANTS = "CREATE TABLE grants (id int PRIMARY KEY, amount int NOT NULL, note text)"
STRICT_GRANTS = ("CREATE TABLE grants (id int PRIMARY KEY, amount int NOT NULL "
                 "CONSTRAINT amount_ok CHECK (amount >= 0), note text)")


def test_init_status_lag_conflicts_dead_letters(invoke: Callable[..., Result], tmp_path: Path,
                                                make_db: Callable[..., str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source, strict, twin = make_db("src"), make_db("strict"), make_db("twin")
    execute(source, GRANTS, "INSERT INTO grants SELECT g, g, 'n' FROM generate_series(1, 500) g")
    execute(strict, STRICT_GRANTS)  # site1 rejects negative amounts: dead letters
    cfg = settings_dict(source, [strict, twin], site_names=["strict", "twin"])
    config = write_config(tmp_path / "cdc-sync.toml", cfg)
    monkeypatch.chdir(tmp_path)  # the default ./cdc-sync.toml

    # init: a progress bar per table on a terminal
    terminal, stderr = io.StringIO(), cli.err
    monkeypatch.setattr(cli, "err", Console(file=terminal, force_terminal=True, width=120))
    result = invoke("init")
    assert result.code == 0, result
    assert "source hq: 1 tables published" in result.out
    assert re.search(r"site strict: ready, copied 500 rows at [0-9A-F]+/[0-9A-F]+", result.out)
    assert "site twin: ready, created 1 tables, copied 500 rows" in result.out
    bars = terminal.getvalue()
    assert "strict: public.grants" in bars and "twin: public.grants" in bars and "500 rows" in bars
    monkeypatch.setattr(cli, "err", stderr)

    settings = make_settings(source, [strict, twin], site_names=["strict", "twin"])
    with running_pipeline(settings) as pipe:
        execute(source, "UPDATE grants SET amount = -1 WHERE id = 7")      # strict rejects it
        execute(strict, "DELETE FROM grants WHERE id = 8")                 # then a conflict:
        execute(source, "UPDATE grants SET note = 'changed' WHERE id = 8")  # update_missing
        wait_until_caught_up(settings, pipeline=pipe)

        result = invoke("status")
        assert result.code == 0, result
        assert "slot" in result.out and "active" in result.out
        assert "strict" in result.out and "twin" in result.out
        st = invoke("status", "--json")
        assert st.code == 0
        data = json.loads(st.out)
        assert [s["name"] for s in data["sites"]] == ["strict", "twin"]
        assert data["sites"][0]["dead_letters"] == 1
        assert "twin" in invoke("lag").out

        result = invoke("dead-letters", "--json")
        assert result.code == 0
        dead = json.loads(result.out)
        assert [(d["site"], d["table"], d["op"], _text_key(d["key"])) for d in dead] == [
            ("strict", "public.grants", "update", {"id": "7"})]
        assert "amount_ok" in dead[0]["error"]
        listed = invoke("dead-letters", "--site", "strict")
        assert "amount_ok" in listed.out and "public.grants" in listed.out
        assert "no dead letters" in invoke("dead-letters", "--site", "twin").out

        result = invoke("conflicts", "--json", "--site", "strict")
        assert result.code == 0
        found = json.loads(result.out)
        assert [(c["kind"], _text_key(c["key"])) for c in found] == [("update_missing", {"id": "8"})]
        assert "update_missing" in invoke("conflicts", "--limit", "5").out
        assert json.loads(invoke("conflicts", "--json", "--site", "twin").out) == []
        assert_one_error_line(invoke("conflicts", "--site", "nowhere"), 'no site named "nowhere"')

        # A retry that still fails: exit 1, one line, the failure in the table.
        result = invoke("dead-letters", "retry", "--site", "strict")
        assert result.code == 1
        assert_one_error_line(result, "1 dead letter could not be re-applied", "strict #")
        assert "failed" in result.out
        # Relax the site, retry by id: resolved, and the row is the source's.
        execute(strict, "ALTER TABLE grants DROP CONSTRAINT amount_ok")
        result = invoke("dead-letters", "retry", "--id", str(dead[0]["id"]), "--json")
        assert result.code == 0, result
        assert json.loads(result.out) == {"strict": {"resolved": [dead[0]["id"]], "failed": {}},
                                          "twin": {"resolved": [], "failed": {}}}
        assert scalar(strict, "SELECT amount FROM grants WHERE id = 7") == -1
        assert json.loads(invoke("dead-letters", "--json").out) == []
        assert "no dead letters to retry" in invoke("dead-letters", "-c", str(config),
                                                    "retry").out
    assert table_fingerprint(source, "public.grants") == table_fingerprint(twin, "public.grants")

    result = invoke("teardown", "-c", str(config))
    assert result.code == 0
    assert result.out.strip() == (f"dropped slot {cfg['source']['slot']}, publication "
                                  f"{cfg['source']['publication']}")


def test_lag_watch(invoke: Callable[..., Result], tmp_path: Path, make_db: Callable[..., str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    source, site = make_db("src"), make_db("site")
    execute(source, GRANTS)
    config = write_config(tmp_path / "c.toml", settings_dict(source, [site]))
    assert invoke("init", "-c", str(config)).code == 0
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_wait", fake_sleep)
    # Not a terminal: the table is printed at each refresh.
    result = invoke("lag", "-c", str(config), "--watch", "--interval", "0.5")
    assert result.code == 0, result
    assert result.out.count("refreshing every 0.5 s") == 3
    assert result.out.count("site1") == 3
    assert sleeps == [0.5, 0.5, 0.5]
    # A terminal: one live view refreshed in place.
    sleeps.clear()
    screen = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=screen, force_terminal=True, width=160))
    result = invoke("lag", "-c", str(config), "--watch", "--interval", "1")
    assert result.code == 0, result
    assert "refreshing every 1 s" in screen.getvalue()
    assert "\x1b[" in screen.getvalue()  # cursor movement: redrawn in place


def test_init_and_help_leave_the_other_verbs_modules_out(tmp_path: Path) -> None:
    """`init` off a terminal (no progress bars) and `--help` import none of what only other
    verbs or views use (the start-up of `cdc-sync init` is part of its wall time)."""
    import subprocess
    import sys

    lazy = ("cdc_sync.pipeline", "cdc_sync.connectors", "cdc_sync.metrics", "cdc_sync.events",
            "cdc_sync.ui", "cdc_sync.demo", "httpx", "rich.progress", "rich.live", "alembic")
    code = ("import sys\nfrom cdc_sync.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
            "    print('exit', exc.code)\n"
            f"print(sorted(m for m in {lazy!r} if m in sys.modules))\n")
    repo = Path(__file__).resolve().parent.parent
    for argv, status, shown in ((["init", "-c", str(tmp_path / "missing.toml")], 1, ""),
                                (["init", "--help"], 0, "copy every site"),
                                (["--help"], 0, "init")):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True, cwd=repo, timeout=120, stdin=subprocess.DEVNULL)
        assert done.stdout.splitlines()[-2:] == [f"exit {status}", "[]"], (argv, done)
        assert shown in done.stdout, (argv, done)
        if status:
            assert done.stderr.startswith("error: config file not found"), done.stderr
