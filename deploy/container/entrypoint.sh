#!/bin/sh
# The image's entry point: start_llm_server with the container's conventions.
#
# - CHAT_SERVER_API_KEY_FILE: a file with the API key(s) (a mounted secret: one key a line, or
#   comma-separated), read once at start into CHAT_SERVER_API_KEY, so the key never shows in
#   `docker inspect`. Setting both variables is an error.
# - stderr (where the server logs) goes to stdout: the container's log is one stream.
# - Arguments that start with "-" go to start_llm_server (docker run IMAGE --open-access); any
#   other command runs instead (docker run IMAGE bash, KubeRay's `ray start ...`).
set -eu

if [ -n "${CHAT_SERVER_API_KEY_FILE:-}" ]; then
    if [ -n "${CHAT_SERVER_API_KEY:-}" ]; then
        echo "llm-server-entrypoint: error: set CHAT_SERVER_API_KEY or CHAT_SERVER_API_KEY_FILE, not both" >&2
        exit 2
    fi
    if [ ! -r "$CHAT_SERVER_API_KEY_FILE" ]; then
        echo "llm-server-entrypoint: error: cannot read CHAT_SERVER_API_KEY_FILE=$CHAT_SERVER_API_KEY_FILE" >&2
        exit 2
    fi
    CHAT_SERVER_API_KEY="$(tr -d ' \r\t' < "$CHAT_SERVER_API_KEY_FILE" | tr '\n' ',' | sed 's/,,*/,/g; s/^,//; s/,$//')"
    if [ -z "$CHAT_SERVER_API_KEY" ]; then
        echo "llm-server-entrypoint: error: CHAT_SERVER_API_KEY_FILE=$CHAT_SERVER_API_KEY_FILE is empty" >&2
        exit 2
    fi
    export CHAT_SERVER_API_KEY
    unset CHAT_SERVER_API_KEY_FILE
fi

exec 2>&1
case "${1:-}" in
    ""|-*) exec start_llm_server "$@" ;;
    *) exec "$@" ;;
esac
