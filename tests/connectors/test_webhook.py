"""WebhookClient against httpx.MockTransport: body, signature, acknowledgement, errors."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import httpx
import pytest

from cdc_sync.config import ConnectorSettings
from cdc_sync.connectors import SIGNATURE_HEADER, DeliveryError, WebhookClient, sign
from cdc_sync.connectors.webhook import safe_url

SECRET = "s3cr3t-hook-key"
URL = "https://hookuser:hookpass@hooks.example.org:8443/cdc/in?token=abc#frag"

EVENTS: list[dict[str, Any]] = [
    {"id": "w/0/1/0", "source": "w", "topic": "public.t", "table": "public.t", "op": "insert",
     "lsn": "0/1", "commit_ts": "2026-11-28T12:00:00.000000+00:00", "key": {"id": 1},
     "row": {"id": 1, "name": "é"}, "old": None},
]


def settings(**kw: Any) -> ConnectorSettings:
    data: dict[str, Any] = {"name": "audit", "kind": "webhook", "url": URL, "secret": SECRET,
                            "timeout_seconds": 2}
    data.update(kw)
    return ConnectorSettings.model_validate(data)


def client_with(handler: Any, **kw: Any) -> WebhookClient:
    return WebhookClient(settings(**kw), transport=httpx.MockTransport(handler))


def test_posts_signed_batch() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = request.content
        expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if request.headers[SIGNATURE_HEADER] != f"sha256={expected}":
            return httpx.Response(401)
        return httpx.Response(204)

    with client_with(handler) as client:
        client.deliver(EVENTS)
    (request,) = seen
    assert request.method == "POST"
    assert request.url.path == "/cdc/in"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"events": EVENTS}
    assert request.content.decode("utf-8").count("é") == 1  # UTF-8, not \\u escapes
    assert request.headers[SIGNATURE_HEADER] == sign(SECRET, request.content)


def test_no_signature_without_secret() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    client_with(handler, secret=None).deliver(EVENTS)
    assert SIGNATURE_HEADER not in seen[0].headers


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_any_2xx_acknowledges(status: int) -> None:
    client_with(lambda _r: httpx.Response(status)).deliver(EVENTS)


@pytest.mark.parametrize("status", [301, 302, 400, 401, 404, 409, 429, 500, 502, 503])
def test_non_2xx_raises(status: int) -> None:
    headers = {"Location": "https://elsewhere.example.org/"} if status in (301, 302) else {}
    client = client_with(lambda _r: httpx.Response(status, headers=headers, text="nope"))
    with pytest.raises(DeliveryError) as info:
        client.deliver(EVENTS)
    message = str(info.value)
    assert f"HTTP {status}" in message
    assert "audit" in message
    assert_no_secrets(message)


def assert_no_secrets(message: str) -> None:
    assert "\n" not in message
    for secret in (SECRET, "hookpass", "hookuser", "token=abc", "frag"):
        assert secret not in message
    assert "https://hooks.example.org:8443/cdc/in" in message


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("[Errno 111] Connection refused"),
    httpx.ReadTimeout("timed out"),
    httpx.ConnectTimeout("timed out"),
    httpx.RemoteProtocolError(f"bad things at {URL} with {SECRET}"),
])
def test_transport_errors_raise(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(DeliveryError) as info:
        client_with(handler).deliver(EVENTS)
    assert_no_secrets(str(info.value))


def test_body_built_once_and_signed_exactly() -> None:
    """The signature covers the exact bytes sent (a receiver recomputes over the raw body)."""
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        assert hmac.compare_digest(request.headers[SIGNATURE_HEADER],
                                   "sha256=" + hmac.new(SECRET.encode(), request.content,
                                                        hashlib.sha256).hexdigest())
        return httpx.Response(200)

    client = client_with(handler)
    client.deliver(EVENTS)
    client.deliver(EVENTS + EVENTS)
    assert bodies[0] != bodies[1]
    assert bodies[0].startswith(b'{"events":[')


def test_unserialisable_events_raise() -> None:
    client = client_with(lambda _r: httpx.Response(200))
    with pytest.raises(DeliveryError):
        client.deliver([{"x": float("nan")}])


def test_safe_url() -> None:
    assert safe_url(URL) == "https://hooks.example.org:8443/cdc/in"
    assert safe_url("http://[::1]:9/x") == "http://[::1]:9/x"
    assert repr(settings()).count(SECRET) == 0
