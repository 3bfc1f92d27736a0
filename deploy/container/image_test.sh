#!/usr/bin/env bash
# `make image-test`: build the image (make image), then check it from outside (deploy/image_test.py)
# with a small client venv (build/image-test-venv: the openai SDK and httpx, not the project).
# Fails with the reason where no container engine can run; only IMAGE_TEST=skip skips it.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${IMAGE_TEST:-}" = skip ]; then
    echo "== IMAGE_TEST=skip: the container image test is skipped"
    exit 0
fi
# shellcheck source=engine.sh
source deploy/container/engine.sh
pick_engine

VENV=build/image-test-venv
if ! "$VENV/bin/python" -c 'import openai, httpx' 2>/dev/null; then
    echo "== client venv $VENV (openai, httpx)"
    rm -rf "$VENV" && python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'openai>=1.40' 'httpx>=0.27'
fi

mkdir -p build
EXTRAS= IMAGE_BUILD_SECONDS_FILE=build/image-build-seconds deploy/container/build_image.sh
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)"
exec "$VENV/bin/python" deploy/image_test.py --engine "$ENGINE" --image "${IMAGE:-llm-server}:$VERSION" \
    --build-seconds "$(cat build/image-build-seconds)"
