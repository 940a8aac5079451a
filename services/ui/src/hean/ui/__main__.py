"""`python -m hean.ui`: serve the dashboard on UI_PORT (default 3000)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from hean.core.logs import JsonFormatter
from hean.core.settings import SettingsError, load_settings
from hean.ui.server import serve
from hean.ui.settings import UiSettings


def configure_logging(settings: UiSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter("ui"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s ui %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


async def _run(settings: UiSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def main() -> int:
    try:
        settings = load_settings(UiSettings)
    except SettingsError as exc:
        print(f"ui: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        asyncio.run(_run(settings))
    except OSError as exc:
        # Most often the port is taken; one line, not a traceback.
        logging.getLogger("hean.ui").error(
            "cannot serve on %s:%d: %s", settings.ui_host, settings.ui_port, exc
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
