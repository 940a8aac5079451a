"""Integration guide, "Replay Events (Debugging)", verbatim inside `run` (the snippet is
top-level await). Reads REDIS_URL from the environment."""
# ruff: noqa
# mypy: ignore-errors
from hean.core.types import EventType


async def run():
    # --- from the guide, unchanged ---
    from hean.core.event_streams import RedisEventStream

    redis_stream = RedisEventStream()
    await redis_stream.connect()

    # Replay last 100 ORDER_FILLED events
    async for event in redis_stream.replay_events(
        event_type=EventType.ORDER_FILLED,
        start_id="-",  # Beginning
        end_id="+"     # End
    ):
        print(event)
    # --- end of the guide's snippet ---
    await redis_stream.close()
