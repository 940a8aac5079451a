"""Integration guide, "Circuit Breaker Pattern", verbatim inside `run` (the snippet is
top-level await; `orchestrator`, `ml_engine` and `features` are the names it assumes)."""
# ruff: noqa
# mypy: ignore-errors


async def run(orchestrator, ml_engine, features):
    # --- from the guide, unchanged ---
    # Execute with circuit breaker protection
    result = await orchestrator.execute_with_circuit_breaker(
        component_name="ml_engine",
        func=ml_engine.predict,
        features=features
    )
    # --- end of the guide's snippet ---
    return result
