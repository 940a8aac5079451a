"""Integration guide, "2. Orchestrator Integration", verbatim inside `run` (the guide's
snippet is top-level await; `event_bus` and `my_module` are the names it assumes)."""
# ruff: noqa
# mypy: ignore-errors


async def run(event_bus, my_module):
    # --- from the guide, unchanged ---
    from hean.core.orchestrator import TradingOrchestrator

    # Create orchestrator
    orchestrator = TradingOrchestrator(bus=event_bus)

    # Register your module
    orchestrator.register_component(
        name="my_module",
        component=my_module,
        circuit_breaker=True,  # Enable fault tolerance
        failure_threshold=5,   # Circuit opens after 5 failures
        timeout=60.0          # Retry after 60 seconds
    )

    # Start (initializes all components)
    await orchestrator.start()
    # --- end of the guide's snippet ---
    return orchestrator
