"""Integration guide, "5. Execution Strategy Integration", verbatim below the marker (plus
the imports the snippet assumes)."""
# ruff: noqa
# mypy: ignore-errors
from hean.core.bus import EventBus
from hean.core.types import Event, EventType

# --- from the guide, unchanged ---
from hean.execution.router import ExecutionRouter

class CustomExecutionStrategy:
    def __init__(self, bus: EventBus, exchange):
        self.bus = bus
        self.exchange = exchange

    async def start(self):
        self.bus.subscribe(EventType.ORDER_APPROVED, self.execute)

    async def execute(self, event: Event):
        order = event.data

        # Custom execution logic (e.g., TWAP, VWAP, Iceberg)
        filled_order = await self.execute_with_strategy(order)

        # Publish fill
        await self.bus.publish(Event(
            event_type=EventType.ORDER_FILLED,
            data=filled_order
        ))
