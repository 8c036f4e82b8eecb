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

import re

_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_dsn(text: str) -> str:
    """Return `text` with any password in a URL or key=value DSN replaced by `***`."""
    text = _PASSWORD_IN_URL.sub(r"\1***\3", text)
    return _PASSWORD_KV.sub(r"\1***", text)


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
