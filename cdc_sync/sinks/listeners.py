"""`ListenerThread`: hands every stream item to an in-process callable, on its own thread.

In-process listeners (RealTimeSync subscribers) see items in stream order. They are live
notifications, not a durable route: they never hold back the slot, and after a restart the
stream resumes where the sites are (use the outbound table and connectors for at-least-once).
A listener that raises is logged and keeps receiving; a slow one makes `put` wait (bounded
queue), like a slow site.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Final

from ..changes import TxItem
from .worker import Keepalive, Reset, WorkItem

log = logging.getLogger(__name__)

LISTENER_QUEUE_ITEMS: Final = 64

Listener = Callable[[TxItem], None]


class ListenerThread(threading.Thread):
    def __init__(self, listener: Listener, name: str = "listener") -> None:
        super().__init__(name=name, daemon=True)
        self.listener = listener
        self.queue: queue.Queue[WorkItem | None] = queue.Queue(maxsize=LISTENER_QUEUE_ITEMS)
        self.accepting = True

    def put(self, item: WorkItem, timeout: float | None = None) -> bool:
        if isinstance(item, (Keepalive, Reset)):
            return True
        try:
            self.queue.put(item, timeout=timeout)
        except queue.Full:
            return False
        return True

    def reset(self) -> None:
        """Listeners get whole transactions only; nothing to forget."""

    def stop(self) -> None:
        self.accepting = False
        self.queue.put(None)

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, (Keepalive, Reset)):
                continue
            try:
                self.listener(item)  # type: ignore[arg-type]
            except Exception:
                log.exception("listener %s failed on %s", self.name, type(item).__name__)
