#!/bin/sh
# Container entry point: check the configuration (one clear line and exit 2 if it is wrong),
# then replace this shell with forward so that it gets the signals (SIGTERM drains, SIGHUP reloads
# TLS). FORWARD lets the tests run this script outside a container.
set -eu
FORWARD="${FORWARD:-forward}"
# shellcheck disable=SC2086 # FORWARD may be a command with arguments ("python3 -m forward")
$FORWARD --check-config "$@" >/dev/null
# shellcheck disable=SC2086
exec $FORWARD "$@"
