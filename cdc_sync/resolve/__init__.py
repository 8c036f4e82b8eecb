"""Conflict policies: given the site's local row and an incoming change, decide what to keep.

Pure code, no I/O: the applier fetches local rows and tombstones set-based, asks a `Resolver`
per change, and writes the decisions set-based. Values are PostgreSQL text forms (`str`) or
`None`; a column absent from `Incoming.new` was not sent (unchanged TOAST).

Version order: `version` of a row is its `version_column` value when the policy has one,
parsed as an integer, numeric or timestamp; otherwise the commit timestamp of the transaction
that wrote it. Ties break by origin name (the larger name wins) so every site decides alike.

The model is in `_model` (`LocalRow`, `Incoming`, `Tombstone`, `Decision`, `Resolver`), the
rules in `_policies` (`make_resolver`), version parsing and counter arithmetic in `_versions`.
"""

from ._model import CONFLICT_KINDS, OUTCOMES, Decision, Incoming, LocalRow, Resolver, Tombstone
from ._policies import MergeFunction, PolicyResolver, make_resolver
from ._versions import Version, add_delta, parse_version, timestamp_version

__all__ = [
    "CONFLICT_KINDS",
    "OUTCOMES",
    "Decision",
    "Incoming",
    "LocalRow",
    "MergeFunction",
    "PolicyResolver",
    "Resolver",
    "Tombstone",
    "Version",
    "add_delta",
    "make_resolver",
    "parse_version",
    "timestamp_version",
]
