"""The cdc_sync error tree, in one place.

    CdcSyncError                 anything cdc_sync reports to a user; str() is one line
    ├── ConfigError              the TOML file, a key, a value, a missing ${VAR}
    ├── SourceError              the source database: reachability, settings, privileges, slot
    ├── SiteError                a site database: reachability, schema, missing columns
    └── ApplyError               a change a site could not apply

`protocol.ProtocolError` lives in the standard-library-only protocol layer and is wrapped at
the source boundary. Messages never contain a password: build them with `mask_dsn`.
"""

from __future__ import annotations

import getpass
import os
import re

_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_dsn(text: str) -> str:
    """Return `text` with any password in a URL or key=value DSN replaced by `***`."""
    text = _PASSWORD_IN_URL.sub(r"\1***\3", text)
    return _PASSWORD_KV.sub(r"\1***", text)


def dsn_label(dsn: str) -> str:
    """`host:port/database` of a connection string, libpq's defaults filled in; no secrets."""
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except Error:
        return "<invalid connection string>"
    host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST")
               or "localhost")
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    database = str(params.get("dbname") or os.environ.get("PGDATABASE") or user)
    return f"{host}:{port}/{database}"


class CdcSyncError(Exception):
    """Base of every error cdc_sync reports; its message is one line without secrets."""

    def __init__(self, message: str) -> None:
        super().__init__(mask_dsn(" ".join(message.split())))


class ConfigError(CdcSyncError):
    """The configuration file or one of its values is wrong."""


class SourceError(CdcSyncError):
    """The source database cannot be used as it is."""


class SiteError(CdcSyncError):
    """A site database cannot be used as it is."""


class ApplyError(CdcSyncError):
    """A change could not be applied to a site."""
