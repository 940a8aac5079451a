"""Integration guide, "3. ML Model Integration", verbatim below the marker (plus the imports
the snippet assumes)."""
# ruff: noqa
# mypy: ignore-errors
import asyncio

from hean.core.bus import EventBus
from hean.core.types import Event

# --- from the guide, unchanged ---
from hean.core.types import EventType

class MyMLModel:
    def __init__(self, bus: EventBus):
        self.bus = bus
        self.model = self.load_model()

    async def start(self):
        # Subscribe to features
        self.bus.subscribe(EventType.FEATURES_READY, self.on_features)

    async def on_features(self, event: Event):
        features = event.data["features"]

        # Run inference (with timeout)
        prediction = await asyncio.wait_for(
            self.predict(features),
            timeout=0.1  # 100ms max
        )

        # Publish prediction
        await self.bus.publish(Event(
            event_type=EventType.ML_PREDICTION,
            data={"prediction": prediction}
        ))

    async def predict(self, features):
        # Your ML logic here
        return self.model.predict(features)
