"""Conflict policies: given the site's local row and an incoming change, decide what to keep.

Pure code, no I/O: the applier fetches local rows and tombstones set-based, asks a `Resolver`
per change, and writes the decisions set-based. Values are PostgreSQL text forms (`str`) or
`None`; a column absent from `Incoming.new` was not sent (unchanged TOAST).

Order: every row, tombstone and change has the key (version, is_delete, origin). `version` is
the `version_column` value when the policy has one (integer, numeric, timestamp or text),
otherwise the commit timestamp; a delete's is `delete_version(V, C)`. Equal versions break
delete-first, then by the larger origin name, so every site decides alike; one office's later
change always wins over its earlier one. The rules are in `_policies`.

The model is in `_model` (`LocalRow`, `Incoming`, `Tombstone`, `Decision`, `Resolver`), the
rules in `_policies` (`make_resolver`), version parsing and counter arithmetic in `_versions`.
"""

from ._columns import changed_columns
from ._model import CONFLICT_KINDS, OUTCOMES, Clock, Clocks, Decision, Incoming, LocalRow, Resolver, Tombstone
from ._policies import MergeFunction, PolicyResolver, make_resolver
from ._versions import Version, add_delta, delete_version, parse_version, timestamp_version

__all__ = [
    "CONFLICT_KINDS",
    "OUTCOMES",
    "Clock",
    "Clocks",
    "Decision",
    "Incoming",
    "LocalRow",
    "MergeFunction",
    "PolicyResolver",
    "Resolver",
    "Tombstone",
    "Version",
    "add_delta",
    "changed_columns",
    "delete_version",
    "make_resolver",
    "parse_version",
    "timestamp_version",
]
