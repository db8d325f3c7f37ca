#!/usr/bin/env bash
# Build every image docker-compose.yml runs, from Debian packages and Python wheels only: no
# container registry is contacted. With podman or docker (ENGINE=..., default: whichever is
# installed, podman first).
#
#   service/deploy/build-images.sh [--rebuild]
#
# Images (kept between runs; --rebuild makes them again):
#   localhost/endofuse-debian:bookworm  mmdebstrap minbase + python3, venv, CA certificates
#   localhost/endofuse-infra:bookworm   mmdebstrap minbase + redis-server, nginx, prometheus
#   localhost/endofuse:cpu              the project's Dockerfile, target cpu, on the first
#                                       (rebuilt whenever its build context changed)
# Grafana has no Debian package: it is not built here (its provisioning is checked
# structurally by tests/test_deployment.py).
#
# Then run compose with the variables this script prints last (eval "$(... | tail -5)"):
# they point the redis, gateway and prometheus services at the infra image (and, with
# podman, name the container config used for the build).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
REBUILD=0
[ "${1:-}" = "--rebuild" ] && REBUILD=1
ENGINE=${ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$ENGINE" ] || { echo "no container engine: install podman or docker" >&2; exit 2; }
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing (apt-get install mmdebstrap)" >&2; exit 2; }

# podman's default rlimits can exceed what this host grants a container (runc then refuses
# to start it): unless CONTAINERS_CONF names a config already, use one within the host's.
if [ "$(basename "$ENGINE")" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
    CONTAINERS_CONF=${TMPDIR:-/tmp}/endofuse-containers.conf
    nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=65536
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=4096:4096"]\n[engine]\nruntime = "runc"\n' \
        "$nofile" "$nofile" > "$CONTAINERS_CONF"
    export CONTAINERS_CONF
fi

BASE=localhost/endofuse-debian:$SUITE
INFRA=localhost/endofuse-infra:$SUITE
APP=localhost/endofuse:cpu
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

have() { [ "$REBUILD" = 0 ] && "$ENGINE" image exists "$1" 2>/dev/null; }
if [ "$(basename "$ENGINE")" = docker ]; then
    have() { [ "$REBUILD" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }
fi

debian_image() {  # name, packages, [customize hook]
    local name=$1 packages=$2 hook=${3:-true}
    if have "$name"; then echo "kept $name"; return; fi
    echo "building $name from Debian $SUITE packages: $packages"
    mmdebstrap --quiet --variant=minbase --include="$packages" \
        --customize-hook="$hook" \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$SUITE" "$WORK/rootfs.tar" "$MIRROR"
    "$ENGINE" import --change 'CMD ["/bin/sh"]' "$WORK/rootfs.tar" "$name" >/dev/null 2>"$WORK/import.log" \
        || { cat "$WORK/import.log" >&2; exit 1; }
    rm -f "$WORK/rootfs.tar"
}

debian_image "$BASE" python3,python3-venv,ca-certificates,passwd
# nginx: Debian's default site would also listen; the gateway brings its own server block.
# Prometheus: /prometheus holds its TSDB, as in the upstream image.
debian_image "$INFRA" redis-server,nginx,prometheus,ca-certificates \
    'rm -f "$1"/etc/nginx/sites-enabled/default && mkdir -p "$1"/prometheus && chmod 777 "$1"/prometheus'

# The app image is kept only while what goes into it is unchanged: a hash of its build
# context travels with it as a label, so an edited tree is never served from a stale image.
CONTEXT=$(find Dockerfile pyproject.toml README.md service models -type f \
    ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
built=$("$ENGINE" image inspect --format '{{ index .Config.Labels "endofuse.context" }}' "$APP" 2>/dev/null || true)
if have "$APP" && [ "$built" = "$CONTEXT" ]; then
    echo "kept $APP (context $CONTEXT)"
else
    echo "building $APP (Dockerfile, target cpu, BASE=$BASE, context $CONTEXT)"
    args=(build --target cpu --build-arg "BASE=$BASE" --label "endofuse.context=$CONTEXT"
          -t "$APP" -t endofuse:cpu)
    if [ "$(basename "$ENGINE")" = podman ]; then
        args+=(--format docker)  # the OCI format has no HEALTHCHECK
        # pip inside the build reaches the package index with the host's CA bundle.
        if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
            args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
        fi
    fi
    "$ENGINE" "${args[@]}" .
fi

cat <<EOF
# images ready; for compose:
${CONTAINERS_CONF:+export CONTAINERS_CONF=$CONTAINERS_CONF}
export ENDOFUSE_REDIS_IMAGE=$INFRA
export ENDOFUSE_GATEWAY_IMAGE=$INFRA
export ENDOFUSE_PROMETHEUS_IMAGE=$INFRA
EOF
