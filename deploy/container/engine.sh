# shellcheck shell=bash
# Sourced by build_image.sh and image_test.sh: picks the container engine and sets ENGINE.
#
#   CONTAINER_ENGINE=docker|podman   force one (default: docker when its daemon answers, else podman)
#
# Where neither can run, podman, runc and debootstrap are installed with apt-get (Debian/Ubuntu as
# root, as on the project's build machines). podman as root without systemd (a VM, a CI runner)
# gets deploy/container/containers.conf: cgroupfs, runc, no default ulimits.

_engine_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

engine_fail() {
    echo "error: no container engine can run here: $*" >&2
    echo "       install docker or podman (or run as root on Debian/Ubuntu so this script can)," >&2
    echo "       or skip the image with IMAGE_TEST=skip" >&2
    exit 1
}

_install_podman() {
    command -v apt-get >/dev/null || engine_fail "no docker daemon, no podman, and no apt-get to install podman"
    [ "$(id -u)" = 0 ] || engine_fail "no docker daemon and no podman; installing podman needs root (apt-get)"
    echo "== installing podman, runc and debootstrap with apt-get (once)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || engine_fail "apt-get update failed"
    apt-get install -y -q podman runc debootstrap >/dev/null || engine_fail "apt-get install podman runc debootstrap failed"
}

_use_podman() {
    command -v podman >/dev/null && command -v runc >/dev/null || _install_podman
    if [ -z "${CONTAINERS_CONF:-}" ] && [ "$(id -u)" = 0 ] && [ ! -d /run/systemd/system ]; then
        export CONTAINERS_CONF="$_engine_dir/containers.conf"
    fi
    podman info >/dev/null 2>&1 || engine_fail "podman is installed but 'podman info' fails: $(podman info 2>&1 | tail -1)"
    ENGINE=podman
}

pick_engine() {
    case "${CONTAINER_ENGINE:-}" in
        docker) docker info >/dev/null 2>&1 || engine_fail "CONTAINER_ENGINE=docker but the docker daemon does not answer"
                ENGINE=docker ;;
        podman) _use_podman ;;
        "") if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else _use_podman; fi ;;
        *) engine_fail "CONTAINER_ENGINE must be docker or podman, not '$CONTAINER_ENGINE'" ;;
    esac
    export ENGINE
    echo "== container engine: $ENGINE ($($ENGINE --version 2>/dev/null | head -1))"
}
