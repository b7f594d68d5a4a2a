"""Counters of the MQTT app, cheap enough to bump per message and read by the demo display."""

from __future__ import annotations

from dataclasses import dataclass

from core.queue.queue_manager import QueueManager

__all__ = ["MqttStats"]


@dataclass(slots=True)
class MqttStats:
    """What the app has done since it started. Plain ints: one event loop writes them.

    Attributes:
        received: Messages that reached the app.
        handled: Messages whose handler returned normally.
        failed: Messages whose handler (or a middleware) raised.
        invalid: Messages refused because their payload failed validation.
        rejected: Messages refused by other middleware (e.g. over a rate limit).
        unmatched: Messages no route matched (or duplicates of another route's copy).
        retried: Handler runs repeated because the previous run raised.
        dropped: QoS 0 messages dropped because `MQTT_RECEIVE_MAXIMUM` messages were in hand.
        connects: Successful connections to the broker (the first one included).
        connected: Whether the app is connected right now.
        manager: The queue manager the handlers dispatch through, if any.
        spooled: Jobs written to the offline spool (the queue could not be reached).
        replayed: Spooled jobs pushed to their queue once it answered again.
        spool_dropped: Spooled jobs the queue refused at replay (logged as errors).
        spool_full: Pushes refused because the spool was full (messages left unacknowledged).
        spool_depth: Jobs in the spool right now.
        unacked: Messages received and not yet acknowledged (in hand: waiting or running).
    """

    received: int = 0
    handled: int = 0
    failed: int = 0
    invalid: int = 0
    rejected: int = 0
    unmatched: int = 0
    retried: int = 0
    dropped: int = 0
    connects: int = 0
    connected: bool = False
    manager: QueueManager | None = None
    spooled: int = 0
    replayed: int = 0
    spool_dropped: int = 0
    spool_full: int = 0
    spool_depth: int = 0
    unacked: int = 0

    @property
    def jobs_dispatched(self) -> int:
        """Jobs queued through `manager` by this process."""
        return 0 if self.manager is None else self.manager.dispatched
