"""Integration guide, "4. Risk Management Integration", verbatim below the marker (plus the
imports the snippet assumes)."""
# ruff: noqa
# mypy: ignore-errors
from hean.core.bus import EventBus
from hean.core.types import Event, EventType

# --- from the guide, unchanged ---
from hean.risk.risk_governor import RiskGovernor

class CustomRiskCheck:
    def __init__(self, bus: EventBus):
        self.bus = bus

    async def start(self):
        # Subscribe to order requests
        self.bus.subscribe(EventType.ORDER_REQUEST, self.validate_order)

    async def validate_order(self, event: Event):
        order = event.data

        # Your risk logic
        if self.is_too_risky(order):
            await self.bus.publish(Event(
                event_type=EventType.ORDER_REJECTED,
                data={
                    "order_id": order["id"],
                    "reason": "Risk limit exceeded"
                }
            ))
            return

        # Approve order
        await self.bus.publish(Event(
            event_type=EventType.ORDER_APPROVED,
            data=order
        ))
