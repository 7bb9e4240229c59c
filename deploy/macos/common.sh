#!/usr/bin/env bash
# Shared by install-worker.sh and uninstall-worker.sh, which source it. Written for macOS's bash 3.2.
set -euo pipefail

# shellcheck disable=SC2034 # used by the scripts that source this file
LABEL=com.depthq.worker
# Seconds to wait for a running worker to stop: the plist's ExitTimeOut plus a margin.
STOP_WAIT_S=700
PROG=$(basename "$0" .sh)

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}
say() { printf '%s: %s\n' "$PROG" "$*"; }

# An absolute path, without requiring it to exist: launchd has no current directory to resolve against.
absolute() {
  case $1 in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

# Unload the agent and wait while the worker finishes the photo in hand. Fails if it was not loaded.
stop_agent() {
  local service=$1 waited=0
  launchctl print "$service" >/dev/null 2>&1 || return 1
  say "stopping $service (it finishes the photo in hand first; up to ${STOP_WAIT_S}s)"
  launchctl bootout "$service" 2>/dev/null || true
  while launchctl print "$service" >/dev/null 2>&1; do
    [ "$waited" -lt "$STOP_WAIT_S" ] ||
      die "$service did not stop within ${STOP_WAIT_S}s; see the worker log, or run: launchctl bootout $service"
    sleep 1
    waited=$((waited + 1))
  done
}
