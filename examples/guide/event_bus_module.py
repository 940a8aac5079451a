"""Integration guide, "1. EventBus Integration", verbatim below the marker."""
# ruff: noqa
# mypy: ignore-errors
# --- from the guide, unchanged ---
from hean.core.bus import EventBus
from hean.core.types import Event, EventType

class MyModule:
    def __init__(self, bus: EventBus):
        self.bus = bus

    async def start(self):
        # Subscribe to events
        self.bus.subscribe(EventType.TICK, self.on_tick)

    async def on_tick(self, event: Event):
        # Process event
        data = event.data

        # Publish new event
        await self.bus.publish(Event(
            event_type=EventType.SIGNAL,
            data={"symbol": "BTC/USDT", "side": "BUY"}
        ))
