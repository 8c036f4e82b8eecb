"""Outbound connectors: delivery from the outbound connector table (`cdc_sync.outbox`).

The outbox site's applier writes one event row per change (`cdc_sync.events.outbox_rows`) in
the same transaction as the rows; a `ConnectorRunner` per `[[connectors]]` entry delivers
them, at least once and in commit order, on its own thread and connection (see `runner`).
`WebhookClient` is the only kind today (see `webhook`).
"""

from __future__ import annotations

from .runner import (
    ConnectorBusy,
    ConnectorRunner,
    DeliveryClient,
    backlog,
    connector_status,
    make_client,
    prune_outbox,
    start_runners,
)
from .webhook import SIGNATURE_HEADER, DeliveryError, WebhookClient, sign

__all__ = [
    "SIGNATURE_HEADER",
    "ConnectorBusy",
    "ConnectorRunner",
    "DeliveryClient",
    "DeliveryError",
    "WebhookClient",
    "backlog",
    "connector_status",
    "make_client",
    "prune_outbox",
    "sign",
    "start_runners",
]
