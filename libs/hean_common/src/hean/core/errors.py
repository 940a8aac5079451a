"""The trading error hierarchy: transient (retry with backoff) versus permanent (dead-letter)."""

from __future__ import annotations


class HeanError(Exception):
    """Base of HEAN's own errors."""


class TransientError(HeanError):
    """Worth retrying: a timeout, a dropped connection, a 5xx, a rate limit."""


class PermanentError(HeanError):
    """Retrying cannot help: bad input, a refused order. Dead-letter it, don't retry."""


class QueueFullError(TransientError):
    """The bounded event queue or outbox is full; the event was not accepted."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(
            f"Queue is full: {what} holds {limit} events (EVENT_MAX_QUEUE_SIZE); "
            "the event was not accepted. Increase EVENT_MAX_QUEUE_SIZE or add consumers."
        )
        self.limit = limit
