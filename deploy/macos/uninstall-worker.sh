#!/usr/bin/env bash
# Stop the depthq worker LaunchAgent and remove it. The venv, config, models and logs stay unless
# --purge. Safe to re-run. Written for macOS's own bash 3.2.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: deploy/macos/uninstall-worker.sh [--purge] [options]

Stops the LaunchAgent $LABEL (the worker finishes the photo in hand first) and removes
~/Library/LaunchAgents/$LABEL.plist. Keeps the venv, config, models and logs.

Options (give the same values as to install-worker.sh):
  --purge           also remove the venv, the models, the config file and the logs
  --prefix DIR      default: ~/depthq (its venv/ and models/)
  --venv DIR        default: PREFIX/venv
  --config FILE     default: ~/Library/Application Support/depthq/config.yaml
  --log-dir DIR     default: ~/Library/Logs/depthq
  -h, --help        this text
EOF
}

PREFIX="$HOME/depthq"
VENV=""
CONFIG="$HOME/Library/Application Support/depthq/config.yaml"
LOG_DIR="$HOME/Library/Logs/depthq"
PURGE=0

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --purge)
      PURGE=1
      shift
      ;;
    --prefix | --venv | --config | --log-dir)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)"
      case $1 in
        --prefix) PREFIX=$(absolute "$2") ;;
        --venv) VENV=$(absolute "$2") ;;
        --config) CONFIG=$(absolute "$2") ;;
        --log-dir) LOG_DIR=$(absolute "$2") ;;
      esac
      shift 2
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
VENV=${VENV:-$PREFIX/venv}

command -v launchctl >/dev/null 2>&1 || die "launchctl not found: not macOS, so there is no LaunchAgent to remove"

DOMAIN="gui/$(id -u)"
SERVICE="$DOMAIN/$LABEL"
PLIST="$HOME/Library/LaunchAgents/$LABEL.plist"

stop_agent "$SERVICE" || say "$SERVICE is not loaded"

if [ -e "$PLIST" ]; then
  rm -f "$PLIST"
  say "removed $PLIST"
fi

# rm -rf only on paths that cannot be a home or the root by mistake.
remove() {
  case $1 in
    "" | / | "$HOME" | "$HOME/") die "refusing to remove '$1'; check --prefix/--venv/--log-dir" ;;
  esac
  if [ -e "$1" ]; then
    rm -rf "$1"
    say "removed $1"
  fi
}

if [ "$PURGE" = 1 ]; then
  remove "$VENV"
  remove "$PREFIX/models"
  remove "$CONFIG"
  remove "$LOG_DIR"
  rmdir "$(dirname "$CONFIG")" "$PREFIX" 2>/dev/null || true
else
  say "kept $VENV, $PREFIX/models, $CONFIG and $LOG_DIR (--purge removes them)"
fi
