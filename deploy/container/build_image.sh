#!/usr/bin/env bash
# `make image`: build the server's image from ./Containerfile with docker or podman and tag it
# llm-server:<version> and llm-server:latest (with EXTRAS=ray: llm-server:<version>-ray, latest-ray).
#
# Settings (environment; the Makefile passes its own): BASE (default python:3.11-slim), TORCH_SPEC,
# TORCH_INDEX, EXTRAS, IMAGE (default llm-server), CONTAINER_ENGINE. Where the default base cannot
# be pulled (no registry, as on the project's build machines), a Debian bookworm base with Python
# 3.11 is built with debootstrap and imported as localhost/debian-py:bookworm (about a minute, once).
# On podman, pip's find-links folder (where a machine keeps its CPU torch wheel) and the machine's CA
# bundle are mounted into the build. Prints the build time; the tags go to stdout's last line.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=engine.sh
source deploy/container/engine.sh
pick_engine

IMAGE="${IMAGE:-llm-server}"
DEFAULT_BASE="python:3.11-slim"
BASE="${BASE:-}"
DEBIAN_BASE="localhost/debian-py:bookworm"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-}"
EXTRAS="${EXTRAS:-}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)"
SUFFIX="${EXTRAS:+-${EXTRAS//,/-}}"

image_exists() { $ENGINE image inspect "$1" >/dev/null 2>&1; }

qualified() {  # podman needs a registry in the name; docker reads short names as docker.io
    case "$1" in */*/*|*.*/*|localhost/*) echo "$1" ;; */*) echo "docker.io/$1" ;; *) echo "docker.io/library/$1" ;; esac
}

unmount_below() {  # what a failed debootstrap may have left mounted in its root (proc, sys)
    local mount
    for mount in $(awk -v r="$1/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r); do umount -l "$mount" || true; done
}

build_debian_base() {
    local root=/var/tmp/llm-server-debian-base mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    command -v debootstrap >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -q debootstrap >/dev/null; } \
        || { echo "error: the Debian base needs debootstrap (apt-get install debootstrap) and root" >&2; exit 1; }
    echo "== building the Debian bookworm base with debootstrap ($mirror), once; takes about a minute"
    unmount_below "$root"
    rm -rf "$root"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
    # What an image base does not need: apt's lists and caches, documentation, man pages, locales.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
        "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
    unmount_below "$root"
    tar -C "$root" --exclude='./proc/*' --exclude='./sys/*' -c . | $ENGINE import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["/bin/bash"]' - "$DEBIAN_BASE" >/dev/null
    rm -rf "$root"
}

choose_base() {
    if [ -n "$BASE" ]; then
        image_exists "$BASE" || image_exists "$(qualified "$BASE")" || timeout 120 $ENGINE pull -q "$(qualified "$BASE")" >/dev/null \
            || { echo "error: BASE=$BASE is neither here nor pullable" >&2; exit 1; }
        image_exists "$BASE" || BASE="$(qualified "$BASE")"
        return
    fi
    BASE="$(qualified "$DEFAULT_BASE")"
    if image_exists "$BASE" || timeout 120 $ENGINE pull -q "$BASE" >/dev/null 2>&1; then return; fi
    echo "== the default base $DEFAULT_BASE cannot be pulled here (no registry reachable):"
    echo "   using a Debian bookworm base with Python 3.11 built with debootstrap, $DEBIAN_BASE"
    image_exists "$DEBIAN_BASE" || build_debian_base
    BASE="$DEBIAN_BASE"
}

find_links_dir() {  # pip's find-links folder of this machine, if it has one
    local dir="${PIP_FIND_LINKS:-}"
    if [ -z "$dir" ]; then
        dir="$(sed -n 's/^ *find-links *= *//p' /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" \
            "$HOME/.pip/pip.conf" 2>/dev/null | head -1)"
    fi
    dir="${dir#file://}"
    [ -n "$dir" ] && [ -d "$dir" ] && echo "$dir" || true
}

choose_base
ARGS=(--build-arg "BASE=$BASE" --build-arg "TORCH_SPEC=$TORCH_SPEC" --build-arg "EXTRAS=$EXTRAS"
      --build-arg "VERSION=$VERSION"
      --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
      --build-arg "SOURCE=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo unknown)}")
LINKS="$(find_links_dir)"
if [ "$ENGINE" = podman ]; then
    ARGS+=(--format docker --network host)  # docker format: OCI images drop HEALTHCHECK
    [ -f /etc/ssl/certs/ca-certificates.crt ] && ARGS+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    if [ -n "$LINKS" ]; then
        ARGS+=(-v "$LINKS:/opt/find-links:ro" --build-arg "FIND_LINKS=/opt/find-links")
        echo "== pip's find-links folder $LINKS is mounted into the build (its wheels are preferred)"
    fi
fi
if [ -z "$TORCH_INDEX" ] && ! { [ -n "$LINKS" ] && [ "$ENGINE" = podman ] && ls "$LINKS"/torch-*+cpu-*.whl >/dev/null 2>&1; }; then
    TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"  # PyPI's plain torch is the CUDA build
fi
ARGS+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")

TAGS=("$IMAGE:$VERSION$SUFFIX" "$IMAGE:latest$SUFFIX")
echo "== $ENGINE build: base $BASE, $TORCH_SPEC ${TORCH_INDEX:-(from the find-links folder)}, extras '${EXTRAS}'"
started=$(date +%s.%N)
$ENGINE build -f Containerfile "${ARGS[@]}" -t "${TAGS[0]}" -t "${TAGS[1]}" .
seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
echo "== built ${TAGS[*]} in ${seconds} s"
echo "$seconds" > "${IMAGE_BUILD_SECONDS_FILE:-/dev/null}"

