"""Dead letters: a change a site rejects for its data is set aside with everything needed to
replay it, and everything else flows; connection failures are never dead letters.

The site `site1` is stricter than the source (a CHECK and a UNIQUE index the source lacks);
`site2` is the source's twin and must never see a dead letter.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from integration.helpers import (
    assert_converged,
    assert_same_tables,
    connect,
    current_lsn,
    execute,
    make_settings,
    replicating,
    run_cli,
    scalar,
    table_fingerprint,
    wait_until_caught_up,
    write_config,
)

from cdc_sync import commands
from cdc_sync.protocol import Lsn

from .helpers import Writer, assert_one_line_error, cli_many, statements_per_thread, terminate

ITEM = "CREATE TABLE item (id int PRIMARY KEY, qty int NOT NULL, code text, note varchar(50))"
STRICT_ITEM = ("CREATE TABLE item (id int PRIMARY KEY, qty int NOT NULL CONSTRAINT qty_ok "
               "CHECK (qty >= 0), code text CONSTRAINT code_once UNIQUE, note varchar(50))")


def _rows_except(dsn: str, ids: set[int]) -> list[str]:
    with connect(dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT t::text FROM item t WHERE NOT id = ANY(%s) ORDER BY 1", (list(ids),))]


def _dead(dsn: str) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        cur = conn.execute(
            "SELECT table_name, op, key, row_data, old_row, lsn::text, commit_ts, error, "
            "sqlstate, resolved FROM cdc_sync.dead_letters ORDER BY id")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def test_rejected_changes_become_dead_letters_and_everything_else_flows(
        make_db: Callable[..., str]) -> None:
    source, site1, site2 = make_db("src"), make_db("strict"), make_db("twin")
    execute(source, ITEM, "INSERT INTO item SELECT g, g, 'c' || g, 'n' FROM generate_series(1, 30) g")
    execute(site1, STRICT_ITEM)
    settings = make_settings(source, [site1, site2])
    bad: set[int] = set()
    with replicating(settings) as pipe:
        # 1. one transaction: 1000 good rows and a bad one in the middle
        before = current_lsn(source)
        execute(source, "INSERT INTO item SELECT g, CASE WHEN g = 1501 THEN -1 ELSE g END, "
                        "'c' || g, 'bulk' FROM generate_series(1001, 2001) g")
        after = current_lsn(source)
        bad.add(1501)
        # 2. an update the site rejects next to one it takes, in one transaction
        execute(source, "UPDATE item SET qty = -5 WHERE id = 10",
                "UPDATE item SET qty = 99 WHERE id = 11")
        bad.add(10)
        # 3. a unique index only the site has, next to a good delete
        execute(source, "INSERT INTO item VALUES (3000, 1, 'dup', 'a'), (3001, 2, 'dup', 'b')",
                "DELETE FROM item WHERE id = 20")
        bad.add(3001)
        wait_until_caught_up(settings, pipeline=pipe, timeout=60)
        assert_same_tables(source, [site2], ["public.item"])  # site2 is the source's twin

        assert _rows_except(site1, bad) == _rows_except(source, bad)
        assert scalar(site1, "SELECT count(*) FROM item WHERE id BETWEEN 1001 AND 2001") == 1000
        assert scalar(site1, "SELECT qty FROM item WHERE id = 10") == 10  # the update was set aside
        assert scalar(site1, "SELECT qty FROM item WHERE id = 11") == 99
        assert scalar(site1, "SELECT count(*) FROM item WHERE id = 20") == 0

        dead = _dead(site1)
        assert [(d["op"], d["key"]) for d in dead] == [
            ("insert", {"id": "1501"}), ("update", {"id": "10"}), ("insert", {"id": "3001"})]
        first = dead[0]
        assert first["table_name"] == "public.item"
        assert first["row_data"] == {"id": "1501", "qty": "-1", "code": "c1501", "note": "bulk"}
        assert before < Lsn.parse(first["lsn"]) <= after
        assert first["commit_ts"] is not None and not first["resolved"]
        assert "qty_ok" in first["error"] and first["sqlstate"] == "23514"
        assert dead[1]["row_data"]["qty"] == "-5" and dead[1]["sqlstate"] == "23514"
        assert dead[2]["sqlstate"] == "23505" and "code_once" in dead[2]["error"]
        assert _dead(site2) == []

        # listing and status
        listed = commands.dead_letters(settings)
        assert [(d["site"], d["table"], d["key"]) for d in listed] == [
            ("site1", "public.item", d["key"]) for d in dead]
        assert listed[0]["row"] == first["row_data"] and listed[0]["error"] == first["error"]
        assert commands.dead_letters(settings, site="site2") == []
        counts = {s["name"]: s["dead_letters"] for s in commands.status(settings)["sites"]}
        assert counts == {"site1": 3, "site2": 0}

        # retrying before the site is fixed fails again and keeps them
        report = commands.retry_dead_letters(settings, site="site1")["site1"]
        assert report.resolved == [] and len(report.failed) == 3
        assert len(commands.dead_letters(settings)) == 3

        # the source moves on: the newest state is what a retry must write
        execute(source, "UPDATE item SET qty = -7, note = 'newest' WHERE id = 1501",
                "DELETE FROM item WHERE id = 3001")
        wait_until_caught_up(settings, pipeline=pipe)
        # fix the site, then retry: every dead letter is resolved, the site equals the source
        execute(site1, "ALTER TABLE item DROP CONSTRAINT qty_ok",
                "ALTER TABLE item DROP CONSTRAINT code_once")
        pending = commands.dead_letters(settings)
        report = commands.retry_dead_letters(settings)["site1"]
        assert report.failed == {}
        assert sorted(report.resolved) == sorted(d["id"] for d in pending)
        assert table_fingerprint(site1, "public.item") == table_fingerprint(source, "public.item")
        assert scalar(site1, "SELECT note FROM item WHERE id = 1501") == "newest"
        assert commands.dead_letters(settings) == []
        assert all(d["resolved"] and d["retried_at"]
                   for d in commands.dead_letters(settings, include_resolved=True))
        assert {s["name"]: s["dead_letters"] for s in commands.status(settings)["sites"]} == {
            "site1": 0, "site2": 0}
        # and the stream goes on applying to the fixed rows
        execute(source, "UPDATE item SET qty = qty + 1 WHERE id IN (10, 1501, 3000)")
        assert_converged(settings, pipe)


def test_a_value_too_long_for_the_site_is_a_dead_letter_not_truncated(
        make_db: Callable[..., str]) -> None:
    source, site = make_db("src"), make_db("narrow")
    execute(source, ITEM)
    execute(site, "CREATE TABLE item (id int PRIMARY KEY, qty int NOT NULL, code text, "
                  "note varchar(10))")
    settings = make_settings(source, [site])
    with replicating(settings) as pipe:
        execute(source, "INSERT INTO item VALUES (1, 1, 'a', 'short'), "
                        "(2, 2, 'b', repeat('x', 20))")
        wait_until_caught_up(settings, pipeline=pipe)
    assert scalar(site, "SELECT note FROM item WHERE id = 1") == "short"
    stored = scalar(site, "SELECT note FROM item WHERE id = 2")
    assert stored is None, f"stored as {stored!r}"
    assert [(d["key"], d["sqlstate"]) for d in _dead(site)] == [({"id": "2"}, "22001")]


def test_healthy_batches_stay_set_based(make_db: Callable[..., str]) -> None:
    """A 10k-row transaction is applied with a handful of statements, and one bad row in a
    thousand costs a bisection (a few dozen statements), not a statement per row."""
    source, site = make_db("src"), make_db("site")
    execute(source, ITEM)
    execute(site, STRICT_ITEM)
    settings = make_settings(source, [site])
    with replicating(settings) as pipe:
        wait_until_caught_up(settings, pipeline=pipe)
        with statements_per_thread() as counts:
            execute(source, "INSERT INTO item SELECT g, g, 'c' || g, 'x' "
                            "FROM generate_series(1, 10000) g")
            wait_until_caught_up(settings, pipeline=pipe)
            healthy = counts["site-site1"]
            counts.clear()
            execute(source, "INSERT INTO item SELECT g, CASE WHEN g = 20500 THEN -1 ELSE g END, "
                            "'c' || g, 'x' FROM generate_series(20001, 21000) g")
            wait_until_caught_up(settings, pipeline=pipe)
            one_bad = counts["site-site1"]
        assert scalar(site, "SELECT count(*) FROM item") == 10999
        assert len(commands.dead_letters(settings)) == 1
    assert 0 < healthy < 50, f"{healthy} statements for a 10k-row transaction"
    assert 0 < one_bad < 150, f"{one_bad} statements for 1000 rows with one bad"


def test_a_lost_site_connection_is_not_a_dead_letter(new_db: Callable[..., str]) -> None:
    """Site backends terminated again and again during a load: the worker reconnects and the
    stream is replayed; nothing is set aside and every site converges."""
    source, site1, site2 = new_db("src"), new_db("site_a"), new_db("site_b")
    execute(source, "CREATE TABLE load (id bigint PRIMARY KEY, v int, pad text)",
            "CREATE TABLE load_log (n int, at text)", "ALTER TABLE load_log REPLICA IDENTITY FULL")
    settings = make_settings(source, [site1, site2])

    def step(conn: psycopg.Connection[Any], i: int) -> None:
        conn.execute("INSERT INTO load SELECT %s * 1000 + g, g, repeat('p', 100) "
                     "FROM generate_series(1, 200) g", (i,))
        conn.execute("UPDATE load SET v = v + 1 WHERE id BETWEEN %s AND %s",
                     (i * 500, i * 500 + 50))
        conn.execute("DELETE FROM load WHERE id = %s", (i * 1000 - 3,))
        conn.execute("INSERT INTO load_log VALUES (%s, 'x')", (i,))

    with replicating(settings) as pipe:
        writer = Writer(source, step, limit=60, pause=0.02)
        writer.start()
        killed = 0
        stop = threading.Event()
        # A worker reconnects with a growing backoff, and an idle one only notices a lost
        # connection with its next change: not every attempt finds a backend to terminate.
        for _ in range(8):
            stop.wait(0.7)
            killed += terminate(site1, "application_name LIKE 'cdc_sync%%' "
                                       "AND datname = current_database()")
            killed += terminate(site2, "application_name LIKE 'cdc_sync%%' "
                                       "AND datname = current_database()")
        writer.stop()
        assert killed >= 2, "no site backend was terminated"
        assert_converged(settings, pipe, timeout=60)
    assert scalar(source, "SELECT count(*) FROM load_log") == writer.committed
    for site in (site1, site2):
        assert scalar(site, "SELECT count(*) FROM cdc_sync.dead_letters") == 0
    assert commands.dead_letters(settings) == []
    assert_same_tables(source, [site1, site2])


def test_dead_letters_cli(new_db: Callable[..., str], tmp_path: Path) -> None:
    """`dead-letters [--site] [--json]` lists them, `dead-letters retry` re-applies them."""
    source, site1, site2 = new_db("src"), new_db("strict"), new_db("twin")
    execute(source, ITEM)
    execute(site1, STRICT_ITEM)
    data = make_settings(source, [site1, site2])
    config = write_config(tmp_path / "c.toml", {
        "source": {"name": data.source.name, "dsn": source, "slot": data.source.slot,
                   "publication": data.source.publication},
        "sites": [{"name": s.name, "dsn": s.dsn} for s in data.sites]})
    with replicating(data) as pipe:
        execute(source, "INSERT INTO item VALUES (1, -1, 'a', 'x'), (2, 2, 'b', 'y')")
        wait_until_caught_up(data, pipeline=pipe)
    every, only2, failing = cli_many([
        ["dead-letters", "-c", str(config), "--json"],
        ["dead-letters", "-c", str(config), "--site", "site2", "--json"],
        ["dead-letters", "retry", "-c", str(config)]])
    assert every.returncode == 0, every.stderr
    listed = json.loads(every.stdout)
    assert [(d["site"], d["table"], d["key"], d["row"]["qty"]) for d in listed] == [
        ("site1", "public.item", {"id": "1"}, "-1")]
    assert "qty_ok" in listed[0]["error"]
    assert only2.returncode == 0 and json.loads(only2.stdout) == [], only2.stderr
    # a retry that cannot succeed yet: non-zero, one line naming it, the letter kept
    assert_one_line_error(failing, "site1")
    assert len(commands.dead_letters(data)) == 1
    execute(site1, "ALTER TABLE item DROP CONSTRAINT qty_ok")
    proc = run_cli("dead-letters", "retry", "-c", str(config), "--site", "site1",
                   "--id", str(listed[0]["id"]))
    assert proc.returncode == 0, proc.stderr
    assert commands.dead_letters(data) == []
    assert table_fingerprint(site1, "public.item") == table_fingerprint(source, "public.item")
