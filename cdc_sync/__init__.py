"""cdc_sync: PostgreSQL change-data-capture over pgoutput, applied to many sites exactly once.

`RealTimeSync` (see `cdc_sync.api`) embeds the replicator in a Python program: subscribe to
row and emitted events, and announce changes with `emit_change`.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncRealTimeSync", "ChangeEvent", "RealTimeSync", "__version__", "emit_change"]

if TYPE_CHECKING:
    from .api import AsyncRealTimeSync, ChangeEvent, RealTimeSync, emit_change

_API = {"AsyncRealTimeSync", "ChangeEvent", "RealTimeSync", "emit_change"}


def __getattr__(name: str) -> Any:
    # Lazy, so `import cdc_sync.protocol` does not pull in psycopg and the pipeline.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
