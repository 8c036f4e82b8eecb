"""`WebhookClient`: delivers a batch of events with one HTTP POST.

Contract (ARCHITECTURE.md, "Events"):

- `deliver(events)` POSTs `{"events": [...]}` (compact UTF-8 JSON, the body bytes built once)
  to the connector's `url` with `Content-Type: application/json` and, when the connector has a
  `secret`, `X-CDC-Signature: sha256=<hex HMAC-SHA256 of those exact body bytes, keyed with
  the UTF-8 secret>`. Receivers verify by recomputing the HMAC over the raw body.
- Any 2xx acknowledges the whole batch. Anything else — another status (redirects are not
  followed), a timeout (`timeout_seconds`), a connection or protocol failure — raises
  `DeliveryError`, one line naming the connector and the URL without credentials, query or
  fragment; the secret never appears.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from ..config import ConnectorSettings
from ..errors import CdcSyncError

__all__ = ["SIGNATURE_HEADER", "DeliveryError", "WebhookClient", "safe_url", "sign"]

SIGNATURE_HEADER: Final = "X-CDC-Signature"
USER_AGENT: Final = "cdc-sync"


class DeliveryError(CdcSyncError):
    """A batch was not acknowledged; it will be delivered again."""


def sign(secret: str, body: bytes) -> str:
    """The `X-CDC-Signature` value for `body`: `sha256=<hex>`."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def safe_url(url: str) -> str:
    """`scheme://host[:port]/path`: no user, password, query or fragment (for messages)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def encode_body(events: list[dict[str, Any]]) -> bytes:
    return json.dumps({"events": events}, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


class WebhookClient:
    """One connector's HTTP client (keeps its connections alive between batches)."""

    def __init__(self, settings: ConnectorSettings, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        self._where = safe_url(settings.url)
        self._secret = settings.secret.encode("utf-8") if settings.secret else None
        self._client = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(settings.timeout_seconds),
            follow_redirects=False,
        )

    def deliver(self, events: list[dict[str, Any]]) -> None:
        """POST one batch; return when acknowledged (2xx), else raise `DeliveryError`."""
        try:
            body = encode_body(events)
        except (TypeError, ValueError) as exc:
            raise DeliveryError(f"webhook {self.name}: events are not JSON-serializable: "
                                f"{type(exc).__name__}") from None
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self._secret is not None:
            digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        try:
            response = self._client.post(self.settings.url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise DeliveryError(f"webhook {self.name} ({self._where}): no answer within "
                                f"{self.settings.timeout_seconds:g} s") from None
        except httpx.HTTPError as exc:
            raise DeliveryError(f"webhook {self.name} ({self._where}): "
                                f"{self._describe(exc)}") from None
        except ValueError:  # an unusable URL that validation let through
            raise DeliveryError(f"webhook {self.name} ({self._where}): invalid URL") from None
        if not 200 <= response.status_code < 300:
            reason = response.reason_phrase or ""
            raise DeliveryError(f"webhook {self.name} ({self._where}): HTTP "
                                f"{response.status_code} {reason}".rstrip())

    def _describe(self, exc: httpx.HTTPError) -> str:
        """The kind of transport failure, without the request's URL or the secret."""
        kind = type(exc).__name__
        # httpx's transport errors carry the underlying OS/SSL message ("[Errno 111]
        # Connection refused"); scrub the URL and secret anyway, keep one capped line.
        text = str(exc)
        text = text.replace(self.settings.url, self._where)
        if self.settings.secret:
            text = text.replace(self.settings.secret, "***")
        detail = text.splitlines()[0][:200] if text else ""
        return f"{kind}: {detail}" if detail else kind

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> WebhookClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

