"""Session settings every cdc_sync connection runs with, and the site connection itself.

Contract: `SESSION_OPTIONS` is given to the source, replication and site connections alike, so
text values are produced on one end and parsed on the other with the same settings (time
zone, date and interval styles, float digits, bytea form): nothing changes between source and
site. Site sessions add planner settings (`SITE_SESSION_OPTIONS`). `connect_site` opens a site
connection (autocommit off) with them.

A module of its own, below `source` and `sinks`, so that the commands which only connect
(`init`, `status`, …) load neither the applier nor the decoder.
"""

from __future__ import annotations

from typing import Any

import psycopg

SESSION_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 "
    "-c bytea_output=hex"
)

# Site sessions only: the set-based statements join a few thousand unnest() rows to the table
# on its key. The planner estimates function scans poorly and would hash-join against a scan
# of the whole table; an index nested loop is what we want, whatever the table's size.
SITE_SESSION_OPTIONS = SESSION_OPTIONS + " -c enable_hashjoin=off -c enable_mergejoin=off"


def connect_site(dsn: str, *, application_name: str = "cdc_sync") -> psycopg.Connection[Any]:
    """Open a site connection with our session settings (autocommit off).

    Like PostgreSQL's own apply worker, we run with `session_replication_role = replica` when
    allowed (superuser), so site triggers and foreign keys do not fire on replicated rows.
    """
    conn = psycopg.connect(
        dsn, autocommit=False, options=SITE_SESSION_OPTIONS, application_name=application_name,
        connect_timeout=10,
    )
    try:
        conn.execute("SET session_replication_role = replica")
        conn.commit()
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
    return conn
