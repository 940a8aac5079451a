"""Container health probe: exit 0 if this process's /health answers 200, else 1.

Runs with the image's Python (slim images have no curl). `/health` answers 200 for healthy
and degraded, 503 for unhealthy (docs/HEALTH.md). Port: HEALTH_PORT (default 8080).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("HEALTH_PORT") or "8080"
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
