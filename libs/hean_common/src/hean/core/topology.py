"""Which service (consumer group) reads which event types.

Every service creates all of these groups when it connects, before it publishes anything.
A group created for the first time starts at the end of its stream (ADR 0002), so without
this an event published before its consumer's very first start (market-data starting
before features, say) would never reach that consumer. The services subscribe exactly to
these types; a test keeps the two in step. Users' own services create their groups when
they start.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import redis.asyncio as aioredis

from hean.core.event_streams import ensure_group, stream_key
from hean.core.types import EventType

E = EventType

#: The service whose ORDER_APPROVED is an order: execution places only its approvals, and
#: the gateway lists only its approvals as orders (a custom check on the bus cannot approve).
APPROVER: Final = "risk"

CONSUMER_GROUPS: Final[Mapping[str, frozenset[EventType]]] = {
    "features": frozenset({E.CANDLE}),
    "ml-service": frozenset({E.FEATURES_READY}),
    "strategy": frozenset({E.ML_PREDICTION}),
    "risk": frozenset(
        {
            E.SIGNAL,
            E.ORDER_REQUEST,
            E.ORDER_FILLED,
            E.ORDER_CANCELLED,
            E.ORDER_REJECTED,
            E.PNL_UPDATE,
            E.TICK,
            E.CANDLE,
        }
    ),
    "execution": frozenset({E.ORDER_APPROVED, E.TICK, E.CANDLE, E.KILLSWITCH_TRIGGERED}),
    "portfolio": frozenset({E.ORDER_FILLED, E.TICK, E.CANDLE}),
}


async def ensure_topology(
    client: aioredis.Redis, groups: Mapping[str, frozenset[EventType]] = CONSUMER_GROUPS
) -> int:
    """Create every missing group (at the end of its stream). Returns how many were created."""
    created = 0
    for group, event_types in groups.items():
        for event_type in sorted(event_types):
            created += await ensure_group(client, stream_key(event_type), group)
    return created
