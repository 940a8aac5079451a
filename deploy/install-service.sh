#!/bin/sh
# Install one HEAN service into a fresh virtual environment: hean-common plus that service's
# distribution and its dependencies, nothing else (no other service, no dev tools).
#
#   deploy/install-service.sh SERVICE PREFIX [SOURCE_ROOT]
#
# SERVICE is a directory under services/ (ml-service, execution, ...); PREFIX the venv to
# create; SOURCE_ROOT the repository root (default: this script's parent). The Dockerfile's
# build stage runs exactly this script; tests/deploy runs it too, so what an image holds is
# checked on a machine without a Docker engine. Writes the module to run to PREFIX/MODULE.
set -eu

service="${1:?usage: install-service.sh SERVICE PREFIX [SOURCE_ROOT]}"
prefix="${2:?usage: install-service.sh SERVICE PREFIX [SOURCE_ROOT]}"
root="${3:-$(cd "$(dirname "$0")/.." && pwd)}"
python="${PYTHON:-python3}"

case "$service" in
    market-data) module=hean.market_data ;;
    ml-service) module=hean.ml ;;
    api-gateway) module=hean.gateway ;;
    features|strategy|risk|execution|portfolio) module="hean.$service" ;;
    *) echo "install-service.sh: unknown service '$service'" >&2; exit 2 ;;
esac

if [ ! -f "$root/services/$service/pyproject.toml" ]; then
    echo "install-service.sh: $root/services/$service/pyproject.toml not found" >&2
    exit 2
fi

"$python" -m venv "$prefix"
# Non-editable installs from the source tree: the venv is self-contained and can be copied.
# Both paths in one command, so hean-common resolves to the local tree, never to PyPI.
"$prefix/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check \
    "$root/libs/hean_common" "$root/services/$service"

# market-data replays the bundled candles by default; only its image carries them.
if [ "$service" = market-data ]; then
    mkdir -p "$prefix/data"
    cp -R "$root/data/ohlcv" "$prefix/data/ohlcv"
fi

# Fail the build here, not at container start, if the entry point is missing.
"$prefix/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module.__main__') is None)" \
    || { echo "install-service.sh: $module.__main__ not importable" >&2; exit 1; }
echo "$module" > "$prefix/MODULE"
