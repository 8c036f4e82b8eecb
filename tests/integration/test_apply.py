"""Apply correctness: what the stream does to the sites, compared row by row with the source.

Every test sets up tables on the source, runs `init` (which creates the site tables and copies
the snapshot), streams changes with a `Pipeline` in a thread, waits until both sites hold the
last source transaction and compares every table in text form.
"""

from __future__ import annotations

import random
from typing import Any

import psycopg
from psycopg import sql

from cdc_sync import commands
from cdc_sync.sinks.worker import ItemBatch

from .conftest import Env
from .helpers import (
    PipelineThread,
    assert_converged,
    connect,
    execute,
    replicating,
    scalar,
    table_fingerprint,
)


def test_many_small_transactions(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE acct (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12,2))",
            "INSERT INTO acct SELECT g, 'o' || g, g * 10 FROM generate_series(1, 200) g")
    settings = env.settings()
    rng = random.Random(7)
    with replicating(settings) as pipe, connect(env.source) as conn:
        next_id = 201
        for _ in range(150):
            with conn.transaction():
                for _ in range(rng.randint(1, 4)):
                    op = rng.random()
                    if op < 0.4:
                        conn.execute("INSERT INTO acct VALUES (%s, %s, %s)",
                                     (next_id, f"n{next_id}", rng.randint(0, 10**6) / 100))
                        next_id += 1
                    elif op < 0.8:
                        conn.execute("UPDATE acct SET balance = balance + %s WHERE id = %s",
                                     (rng.randint(-500, 500), rng.randint(1, next_id)))
                    else:
                        conn.execute("DELETE FROM acct WHERE id = %s", (rng.randint(1, next_id),))
        assert_converged(settings, pipe, min_rows=200)
        # Each site records how far it got in its own progress row.
        for site in env.sites:
            assert scalar(site, "SELECT count(*) FROM cdc_sync.progress") == 1


def test_one_large_transaction(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE big (id bigint PRIMARY KEY, grp int, payload text, amount numeric)",
            "INSERT INTO big SELECT g, g % 10, 'snap' || g, g FROM generate_series(1, 1000) g")
    settings = env.settings()
    with replicating(settings) as pipe:
        # one transaction: 50k inserts, then updates and deletes of rows inserted in it
        execute(env.source,
                "INSERT INTO big SELECT g, g % 10, md5(g::text), g / 7.0 "
                "FROM generate_series(1001, 51000) g",
                "UPDATE big SET payload = payload || '!' WHERE grp = 3",
                "DELETE FROM big WHERE grp = 5 AND id > 40000")
        assert_converged(settings, pipe, timeout=60, min_rows=40000)
        # and a second large one that touches every row
        execute(env.source, "UPDATE big SET amount = -amount, grp = grp + 1")
        assert_converged(settings, pipe, timeout=60, min_rows=40000)
        assert table_fingerprint(env.sites[1], "public.big")[0].endswith(")")


def _incompressible(seed: int, size: int = 12_000) -> str:
    rng = random.Random(seed)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return "".join(rng.choice(alphabet) for _ in range(size))


def test_unchanged_toast_values_are_kept(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE doc (id int PRIMARY KEY, rev int, big text, title text)",
            "ALTER TABLE doc ALTER COLUMN big SET STORAGE EXTERNAL",  # out of line, uncompressed
            "CREATE TABLE doc_full (rev int, big text, title text)",  # keyless, identity FULL
            "ALTER TABLE doc_full REPLICA IDENTITY FULL",
            "ALTER TABLE doc_full ALTER COLUMN big SET STORAGE EXTERNAL")
    big = [_incompressible(i) for i in range(4)]
    execute(env.source, "INSERT INTO doc VALUES (1, 0, %s, 'snapshot')", params=(big[0],))
    settings = env.settings()
    with replicating(settings) as pipe:
        with connect(env.source) as conn:
            conn.execute("INSERT INTO doc VALUES (2, 0, %s, 'streamed'), (3, 0, %s, 'x')",
                         (big[1], big[2]))
            conn.execute("INSERT INTO doc_full VALUES (0, %s, 'a'), (0, %s, 'a')",
                         (big[3], big[3]))
        assert_converged(settings, pipe)
        # updates that do not touch `big`: the stream carries it as "unchanged TOAST"
        execute(env.source, "UPDATE doc SET rev = rev + 1, title = 'edited'")
        execute(env.source, "UPDATE doc SET rev = rev + 1 WHERE id = 2",
                "UPDATE doc SET title = 'twice' WHERE id = 2")
        execute(env.source, "UPDATE doc SET id = 30 WHERE id = 3")  # key change, big unchanged
        execute(env.source,
                "UPDATE doc_full SET rev = 1 WHERE ctid = (SELECT min(ctid) FROM doc_full)")
        assert_converged(settings, pipe)
        for site in env.sites:
            with connect(site) as conn:
                rows = conn.execute("SELECT id, rev, title, big FROM doc ORDER BY id").fetchall()
                full = conn.execute("SELECT rev, big FROM doc_full ORDER BY rev").fetchall()
            assert [(r[0], r[1], r[2]) for r in rows] == [
                (1, 1, "edited"), (2, 2, "twice"), (30, 1, "edited")]
            assert [r[3] for r in rows] == [big[0], big[1], big[2]]
            assert full == [(0, big[3]), (1, big[3])]


def test_primary_key_changes(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE k (id int PRIMARY KEY, v text)",
            "CREATE TABLE k2 (a int, b text, v text, PRIMARY KEY (a, b))",
            "INSERT INTO k SELECT g, 'v' || g FROM generate_series(1, 20) g",
            "INSERT INTO k2 SELECT g, 'b' || g, 'v' FROM generate_series(1, 5) g")
    settings = env.settings()
    with replicating(settings) as pipe:
        # swap two keys through a temporary value, in one transaction
        execute(env.source,
                "UPDATE k SET id = -1 WHERE id = 1",
                "UPDATE k SET id = 1 WHERE id = 2",
                "UPDATE k SET id = 2 WHERE id = -1")
        # a chain: 11 -> 12 after 12 -> 30 (b -> c, then a -> b)
        execute(env.source,
                "UPDATE k SET id = 30, v = 'was 12' WHERE id = 12",
                "UPDATE k SET id = 12, v = 'was 11' WHERE id = 11")
        # shift a range of keys up by one, highest first
        execute(env.source, "DELETE FROM k WHERE id = 20",
                *[sql.SQL("UPDATE k SET id = {} WHERE id = {}").format(i + 1, i)
                  for i in range(19, 14, -1)])
        # key moved away and the old key reused by a new row in the same transaction
        execute(env.source, "UPDATE k SET id = 100 WHERE id = 5",
                "INSERT INTO k VALUES (5, 'new five')")
        # composite keys: change one key column, swap them
        execute(env.source, "UPDATE k2 SET b = 'changed' WHERE a = 1",
                "UPDATE k2 SET a = 0 WHERE a = 2",
                "UPDATE k2 SET a = 2 WHERE a = 3",
                "UPDATE k2 SET a = 3 WHERE a = 0")
        assert_converged(settings, pipe)
        assert scalar(env.sites[0], "SELECT v FROM k WHERE id = 1") == "v2"
        assert scalar(env.sites[0], "SELECT v FROM k WHERE id = 2") == "v1"
        assert scalar(env.sites[1], "SELECT v FROM k WHERE id = 12") == "was 11"


def test_truncate(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE seq_t (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text)",
            "CREATE TABLE parent (id int PRIMARY KEY)",
            "CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent)",
            "CREATE TABLE other (id int PRIMARY KEY)",
            "INSERT INTO seq_t (v) SELECT 'v' || g FROM generate_series(1, 50) g",
            "INSERT INTO parent SELECT generate_series(1, 10)",
            "INSERT INTO child SELECT g, g FROM generate_series(1, 10) g",
            "INSERT INTO other SELECT generate_series(1, 10)")
    settings = env.settings()
    with replicating(settings) as pipe:
        execute(env.source, "TRUNCATE seq_t")
        execute(env.source, "INSERT INTO seq_t (v) VALUES ('after plain truncate')")
        assert_converged(settings, pipe)
        assert table_fingerprint(env.sites[0], "public.seq_t") == ["(51,\"after plain truncate\")"]
        execute(env.source, "TRUNCATE seq_t RESTART IDENTITY",
                "INSERT INTO seq_t (v) VALUES ('restarted')")
        # truncate and refill in one transaction, with other tables' changes around it
        execute(env.source, "INSERT INTO other VALUES (11)", "TRUNCATE other",
                "INSERT INTO other VALUES (1), (2)")
        execute(env.source, "TRUNCATE parent CASCADE")
        execute(env.source, "INSERT INTO parent VALUES (7)", "INSERT INTO child VALUES (70, 7)")
        assert_converged(settings, pipe)
        assert table_fingerprint(env.sites[1], "public.seq_t") == ["(1,restarted)"]
        assert table_fingerprint(env.sites[1], "public.child") == ["(70,7)"]
        assert table_fingerprint(env.sites[1], "public.other") == ["(1)", "(2)"]


def test_keyless_duplicates_stay_duplicates(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE dup (a int, b text, c numeric)",
            "ALTER TABLE dup REPLICA IDENTITY FULL",
            "INSERT INTO dup VALUES (1, 'x', 1.0), (1, 'x', 1.0), (1, 'x', 1.0), "
            "(2, NULL, NULL), (2, NULL, NULL)")
    settings = env.settings()
    with replicating(settings) as pipe:
        execute(env.source, "INSERT INTO dup VALUES (3, 'y', 'NaN'), (3, 'y', 'NaN')")
        # delete exactly one of three identical rows
        execute(env.source,
                "DELETE FROM dup WHERE ctid = (SELECT min(ctid) FROM dup WHERE a = 1)")
        # update one of two identical rows with NULLs, and one of two with NaN
        execute(env.source,
                "UPDATE dup SET b = 'changed' WHERE ctid = (SELECT max(ctid) FROM dup WHERE a = 2)")
        execute(env.source,
                "UPDATE dup SET c = 2 WHERE ctid = (SELECT min(ctid) FROM dup WHERE a = 3)",
                "DELETE FROM dup WHERE ctid = (SELECT min(ctid) FROM dup WHERE a = 3 AND c = 2)")
        assert_converged(settings, pipe)
        for site in env.sites:
            assert table_fingerprint(site, "public.dup") == [
                "(1,x,1.0)", "(1,x,1.0)", "(2,,)", "(2,changed,)", "(3,y,NaN)"]


def test_generated_columns(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE line (id int PRIMARY KEY, qty int NOT NULL, price numeric(10,2),"
            " total numeric GENERATED ALWAYS AS (qty * price) STORED,"
            " label text GENERATED ALWAYS AS ('#' || id::text || ' x' || qty::text) STORED)",
            "INSERT INTO line (id, qty, price) SELECT g, g, g * 1.5 FROM generate_series(1, 5) g")
    # the second site already has the table, with the same generated columns
    execute(env.sites[1],
            "CREATE TABLE line (id int PRIMARY KEY, qty int NOT NULL, price numeric(10,2),"
            " total numeric GENERATED ALWAYS AS (qty * price) STORED,"
            " label text GENERATED ALWAYS AS ('#' || id::text || ' x' || qty::text) STORED)")
    settings = env.settings()
    with replicating(settings) as pipe:
        execute(env.source, "INSERT INTO line (id, qty, price) VALUES (10, 3, 2.50)",
                "UPDATE line SET qty = qty * 10 WHERE id <= 2",
                "UPDATE line SET id = 20 WHERE id = 3",
                "DELETE FROM line WHERE id = 4")
        assert_converged(settings, pipe)
        for site in env.sites:
            assert scalar(site, "SELECT total::text || ' ' || label FROM line WHERE id = 10") \
                == "7.50 #10 x3"
            assert scalar(site, "SELECT attgenerated FROM pg_attribute "
                                "WHERE attrelid = 'line'::regclass AND attname = 'total'") == "s"


QUOTED_SCHEMA = 'Mixed Case "Schema"'
QUOTED_TABLE = "select"
QUOTED_TABLE2 = "Größe order"


def test_quoted_identifiers(env: Env) -> None:
    schema = sql.Identifier(QUOTED_SCHEMA)
    t1 = sql.Identifier(QUOTED_SCHEMA, QUOTED_TABLE)
    t2 = sql.Identifier("public", QUOTED_TABLE2)
    execute(env.source,
            sql.SQL("CREATE SCHEMA {}").format(schema),
            sql.SQL('CREATE TABLE {} ("Order" int, "select" text, "Größe" numeric, '
                    '"with space" text, "a""quote" text, "UPPER" int, lower int, '
                    'PRIMARY KEY ("Order", "with space"))').format(t1),
            sql.SQL('CREATE TABLE {} ("from" int PRIMARY KEY, "a,b" text, "😀" text, '
                    '"order" int)').format(t2),
            sql.SQL("INSERT INTO {} VALUES (1, 'snap', 1.5, 'k 1', 'q\"', 1, 1)").format(t1),
            sql.SQL("INSERT INTO {} VALUES (1, 'x,y', 'smile', 1)").format(t2))
    settings = env.settings(tables=[f"{QUOTED_SCHEMA}.*", "public.*"])
    tables = [f"{QUOTED_SCHEMA}.{QUOTED_TABLE}", f"public.{QUOTED_TABLE2}"]
    with replicating(settings) as pipe:
        execute(env.source,
                sql.SQL("INSERT INTO {} VALUES (2, 'two', 2, 'k 2', 'q''', 2, 2), "
                        "(3, 'three', 3, 'k 3', NULL, 3, 3)").format(t1),
                sql.SQL("UPDATE {} SET \"select\" = 'updated', \"Größe\" = 9.75 "
                        "WHERE \"Order\" = 1").format(t1),
                sql.SQL("UPDATE {} SET \"with space\" = 'moved' WHERE \"Order\" = 2").format(t1),
                sql.SQL("DELETE FROM {} WHERE \"Order\" = 3").format(t1),
                sql.SQL("INSERT INTO {} VALUES (2, 'c', 'd', 2)").format(t2),
                sql.SQL("UPDATE {} SET \"from\" = 10, \"😀\" = 'grin', \"order\" = -1 WHERE \"from\" = 1")
                .format(t2))
        assert_converged(settings, pipe, tables)
        for site in env.sites:
            assert table_fingerprint(site, t1) == [
                '(1,updated,9.75,"k 1","q""",1,1)', "(2,two,2,moved,q',2,2)"]
            assert table_fingerprint(site, t2) == ['(10,"x,y",grin,-1)', '(2,c,d,2)']


def test_interleaved_changes_to_one_key_in_one_transaction(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE il (id int PRIMARY KEY, v int, note text)",
            "INSERT INTO il SELECT g, 0, 'snap' FROM generate_series(1, 10) g")
    settings = env.settings()
    with replicating(settings) as pipe:
        execute(env.source,
                "INSERT INTO il VALUES (100, 1, 'a')",
                "UPDATE il SET v = 2 WHERE id = 100",
                "DELETE FROM il WHERE id = 100",
                "INSERT INTO il VALUES (100, 3, 'b')",
                "UPDATE il SET id = 101 WHERE id = 100",
                "INSERT INTO il VALUES (100, 4, 'c')",
                "UPDATE il SET v = v + 1",
                "DELETE FROM il WHERE id = 1",
                "INSERT INTO il VALUES (1, 5, 'back')",
                "DELETE FROM il WHERE id = 2",
                "INSERT INTO il VALUES (2, 6, 'x')",
                "UPDATE il SET note = 'y' WHERE id = 2",
                "DELETE FROM il WHERE id = 2",
                "UPDATE il SET v = 7 WHERE id = 3",
                "UPDATE il SET v = 8 WHERE id = 3",
                "UPDATE il SET id = 2 WHERE id = 3")
        # many statements each touching many rows, alternating, in one transaction
        with connect(env.source) as conn, conn.transaction():
            for i in range(30):
                conn.execute("UPDATE il SET v = v + %s WHERE id %% 3 = %s", (i, i % 3))
                conn.execute("INSERT INTO il VALUES (%s, %s, 'loop')", (1000 + i, i))
                if i % 4 == 0:
                    conn.execute("DELETE FROM il WHERE id = %s", (1000 + i,))
        assert_converged(settings, pipe)
        assert scalar(env.sites[0], "SELECT count(*) FROM il WHERE id = 2") == 1
        assert scalar(env.sites[1], "SELECT note FROM il WHERE id = 101") == "b"


def test_values_do_not_depend_on_the_writers_session_settings(env: Env) -> None:
    """Text forms depend on session settings (TimeZone, DateStyle, IntervalStyle): the
    writer's do not matter, the replicator reads and writes with its own."""
    execute(env.source,
            "CREATE TABLE tz (id int PRIMARY KEY, at timestamptz, d date, iv interval)")
    settings = env.settings()
    with replicating(settings) as pipe:
        with psycopg.connect(env.source, autocommit=True,
                             options="-c TimeZone=Asia/Kathmandu -c DateStyle=SQL,DMY "
                                     "-c IntervalStyle=sql_standard") as conn:
            conn.execute("INSERT INTO tz VALUES (1, '2024-03-01 10:00:00+05:45', "
                         "'01/02/2024', '1 year 2 months 3 days 04:05:06')")
        assert_converged(settings, pipe)
        assert scalar(env.sites[0], "SELECT at = '2024-03-01 04:15:00+00' AND "
                                    "d = '2024-02-01' FROM tz WHERE id = 1") is True


def test_deferrable_primary_key_swaps(env: Env) -> None:
    """Keys swapped or shifted in one statement, which a DEFERRABLE key allows on the source
    (with REPLICA IDENTITY FULL, required for it): the site's key is created deferrable too,
    so replaying the row changes one by one passes through the same transient duplicates."""
    execute(env.source,
            "CREATE TABLE d (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text)",
            "ALTER TABLE d REPLICA IDENTITY FULL",
            "INSERT INTO d SELECT g, 'v' || g FROM generate_series(1, 5) g")
    settings = env.settings()
    with replicating(settings) as pipe:
        execute(env.source, "UPDATE d SET id = CASE id WHEN 1 THEN 2 WHEN 2 THEN 1 ELSE id END")
        execute(env.source, "UPDATE d SET id = id + 1")
        execute(env.source, "UPDATE d SET id = 8 - id")  # reverses 2..6
        assert_converged(settings, pipe)
        for site in env.sites:
            assert scalar(site, "SELECT count(*) FROM cdc_sync.dead_letters") == 0
            assert table_fingerprint(site, "public.d") == table_fingerprint(env.source, "public.d")


def test_a_backlog_is_handed_to_the_sites_in_batches(env: Env) -> None:
    """Decode once, hand over per read: a backlog of 300 one-row transactions reaches a site
    worker in far fewer queue entries than its 900 items (TxBegin, TxChanges, TxCommit each),
    in order, and the site ends equal to the source."""
    execute(env.source, "CREATE TABLE small (id int PRIMARY KEY, v int NOT NULL)")
    settings = env.settings()
    commands.init(settings)
    with connect(env.source) as conn:
        for i in range(300):
            conn.execute("INSERT INTO small VALUES (%s, %s)", (i, i))
    entries: list[object] = []
    runner = PipelineThread(settings)
    for worker in runner.pipeline.workers:
        original = worker.put

        def spy(item: Any, timeout: float | None = None, _put: Any = original) -> bool:
            entries.append(item)
            ok: bool = _put(item, timeout)
            return ok

        worker.put = spy  # type: ignore[method-assign]
    runner.start()
    try:
        assert_converged(settings, runner.pipeline)
    finally:
        runner.stop()
    per_site = len(entries) / len(settings.sites)
    batches = [e for e in entries if isinstance(e, ItemBatch)]
    assert per_site < 300, f"{per_site:.0f} queue entries per site for 300 transactions"
    assert max(b.changes for b in batches) >= 10
