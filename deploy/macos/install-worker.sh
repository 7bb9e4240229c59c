#!/usr/bin/env bash
# Install or update the depthq worker on a Mac mini: a venv, a config file, the Core ML model and a
# launchd LaunchAgent that starts `depthq work` at login and restarts it whenever it exits.
#
# Safe to re-run: it updates the venv from this checkout, re-renders the agent and restarts it. It
# never overwrites an existing config file. Written for macOS's own bash 3.2.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
. "$(dirname "$0")/common.sh"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
TEMPLATE="$REPO/deploy/macos/$LABEL.plist"

usage() {
  cat <<EOF
Usage: deploy/macos/install-worker.sh --redis-url URL (--watch DIR --output DIR | --no-share) [options]

Installs depthq from $REPO into a venv, writes a config file (only if there is none yet),
downloads a Core ML model and starts the worker as the LaunchAgent $LABEL.
Re-run it after a git pull to update and restart the worker.

Config (used only when the config file does not exist yet; later, edit the file):
  --redis-url URL        the central Redis, e.g. redis://watcher.local:6379/0 or rediss://...
  --password-file FILE   a file whose first line is the Redis password (redis.password_file)
  --ca-file FILE         CA certificate for a rediss:// URL (redis.ca_file)
  --watch DIR            where this Mac sees the watched folder (producer.watch)
  --output DIR           where this Mac writes results (output.dir)
  --no-share             this Mac mounts no share: the watcher uses transport.mode redis, so
                         photos and results travel through Redis (no --watch or --output)

Options:
  --model NAME           Core ML model for \`depthq models download\` (default: DepthPro)
  --skip-model           do not download a model (e.g. you copied one into PREFIX/models)
  --prefix DIR           venv, models and working directory (default: ~/depthq)
  --venv DIR             the venv (default: PREFIX/venv)
  --config FILE          the config file (default: ~/Library/Application Support/depthq/config.yaml)
  --log-dir DIR          where worker.log goes (default: ~/Library/Logs/depthq)
  --log-level LEVEL      DEBUG, INFO or WARNING (default: INFO)
  --python PYTHON        the Python (>= 3.11) to build the venv with (default: the newest found)
  --render-only DIR      only write the plist (and the config, default DIR/config.yaml) into DIR:
                         no venv, pip, model download or launchctl; works on any OS
  -h, --help             this text
EOF
}

PREFIX="$HOME/depthq"
VENV=""
CONFIG=""
LOG_DIR="$HOME/Library/Logs/depthq"
LOG_LEVEL=INFO
REDIS_URL=""
PASSWORD_FILE=""
CA_FILE=""
WATCH=""
OUTPUT=""
NO_SHARE=""
MODEL=DepthPro
SKIP_MODEL=0
PYTHON=""
RENDER_ONLY=""

while [ $# -gt 0 ]; do
  case $1 in
    --*=*)
      # --flag=value: split it, then handle it as --flag value.
      flag=${1%%=*}
      value=${1#*=}
      shift
      set -- "$flag" "$value" ${1+"$@"}
      continue
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --skip-model)
      SKIP_MODEL=1
      shift
      continue
      ;;
    --no-share)
      NO_SHARE=1
      shift
      continue
      ;;
    --prefix | --venv | --config | --log-dir | --log-level | --redis-url | --password-file | --ca-file | \
      --watch | --output | --model | --python | --render-only)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)"
      case $2 in *$'\n'*) die "$1: a value with a line break cannot go into a plist or a config line" ;; esac
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  case $1 in
    --prefix) PREFIX=$(absolute "$2") ;;
    --venv) VENV=$(absolute "$2") ;;
    --config) CONFIG=$(absolute "$2") ;;
    --log-dir) LOG_DIR=$(absolute "$2") ;;
    --log-level) LOG_LEVEL=$(printf '%s' "$2" | tr '[:lower:]' '[:upper:]') ;;
    --redis-url) REDIS_URL=$2 ;;
    --password-file) PASSWORD_FILE=$(absolute "$2") ;;
    --ca-file) CA_FILE=$(absolute "$2") ;;
    --watch) WATCH=$(absolute "$2") ;;
    --output) OUTPUT=$(absolute "$2") ;;
    --model) MODEL=$2 ;;
    --python) PYTHON=$2 ;;
    --render-only) RENDER_ONLY=$(absolute "$2") ;;
  esac
  shift 2
done

case $LOG_LEVEL in
  DEBUG | INFO | WARNING | ERROR) ;;
  *) die "--log-level: '$LOG_LEVEL' is not one of DEBUG, INFO, WARNING, ERROR" ;;
esac
[ -f "$TEMPLATE" ] || die "template $TEMPLATE is missing; run this script from a depthq checkout"

VENV=${VENV:-$PREFIX/venv}
WORKDIR=$PREFIX
if [ -n "$RENDER_ONLY" ]; then
  CONFIG=${CONFIG:-$RENDER_ONLY/config.yaml}
  PLIST="$RENDER_ONLY/$LABEL.plist"
else
  CONFIG=${CONFIG:-$HOME/Library/Application Support/depthq/config.yaml}
  PLIST="$HOME/Library/LaunchAgents/$LABEL.plist"
fi

# ---------------------------------------------------------------------------------------- config

# A YAML double-quoted scalar: any path or URL stays one string (spaces, colons, '#').
yaml_quote() {
  printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
}

# Before anything slow: a first install needs the settings for its config file.
check_config_inputs() {
  [ ! -e "$CONFIG" ] || return 0
  local missing=""
  [ -n "$REDIS_URL" ] || missing="$missing --redis-url"
  if [ -n "$NO_SHARE" ]; then
    [ -z "$WATCH$OUTPUT" ] || die "--no-share: this Mac mounts no share, so --watch and --output do not apply"
  else
    [ -n "$WATCH" ] || missing="$missing --watch"
    [ -n "$OUTPUT" ] || missing="$missing --output"
  fi
  [ -z "$missing" ] || die "no config at $CONFIG yet, so these are needed to write one:$missing (see --help)"
  case $REDIS_URL in
    redis://* | rediss://*) ;;
    *) die "--redis-url: '$REDIS_URL' is not a redis:// or rediss:// URL" ;;
  esac
  case $REDIS_URL in
    *://*:*@*) say "warning: the Redis URL carries a password; --password-file keeps it out of the config" ;;
  esac
  if [ -n "$PASSWORD_FILE" ] && [ ! -f "$PASSWORD_FILE" ]; then
    say "warning: $PASSWORD_FILE does not exist yet; the worker stops at start until it does"
  fi
}

write_config() {
  if [ -e "$CONFIG" ]; then
    say "kept the existing config $CONFIG (edit it to change settings; the flags only seed a new one)"
    return
  fi
  mkdir -p "$(dirname "$CONFIG")"
  local tmp="$CONFIG.tmp.$$"
  {
    echo "# depthq worker on this Mac, written by deploy/macos/install-worker.sh."
    echo "# The installer never overwrites this file: edit it here. config.yaml in the repository"
    echo "# describes every key."
    echo "redis:"
    echo "  url: $(yaml_quote "$REDIS_URL")"
    [ -z "$PASSWORD_FILE" ] || echo "  password_file: $(yaml_quote "$PASSWORD_FILE")"
    [ -z "$CA_FILE" ] || echo "  ca_file: $(yaml_quote "$CA_FILE")"
    if [ -n "$NO_SHARE" ]; then
      echo "# No share: photos and results travel through Redis (transport.mode redis on the watcher)."
    else
      echo "producer:"
      echo "  # Where this Mac sees the folder that the watcher watches (the share, mounted here)."
      echo "  watch: $(yaml_quote "$WATCH")"
      echo "output:"
      echo "  dir: $(yaml_quote "$OUTPUT")"
    fi
    echo "model:"
    echo "  cache_dir: $(yaml_quote "$PREFIX/models")"
  } >"$tmp"
  chmod 600 "$tmp"
  mv -f "$tmp" "$CONFIG"
  say "wrote $CONFIG"
}

# ----------------------------------------------------------------------------------------- plist

xml_escape() { printf '%s' "$1" | sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g'; }
# A sed s||| command that puts the value in literally: XML-escaped, then \, & and | escaped for sed.
substitution() {
  printf 's|%s|%s|g' "$1" "$(xml_escape "$2" | sed -e 's/[\\&|]/\\&/g')"
}

render_plist() {
  mkdir -p "$(dirname "$PLIST")"
  local tmp="$PLIST.tmp.$$"
  sed -e '/^<!-- template:/,/^-->/d' \
    -e "$(substitution __DEPTHQ_BIN__ "$VENV/bin/depthq")" \
    -e "$(substitution __VENV_BIN__ "$VENV/bin")" \
    -e "$(substitution __CONFIG__ "$CONFIG")" \
    -e "$(substitution __LOG_LEVEL__ "$LOG_LEVEL")" \
    -e "$(substitution __LOG_DIR__ "$LOG_DIR")" \
    -e "$(substitution __WORKDIR__ "$WORKDIR")" \
    "$TEMPLATE" >"$tmp"
  if grep -q '__[A-Z_]*__' "$tmp"; then
    rm -f "$tmp"
    die "$TEMPLATE has a placeholder this script does not fill in; add it to render_plist"
  fi
  if command -v plutil >/dev/null 2>&1; then
    plutil -lint -s "$tmp" || {
      rm -f "$tmp"
      die "the rendered plist is not valid (plutil -lint above); check $TEMPLATE"
    }
  fi
  mv -f "$tmp" "$PLIST"
  say "wrote $PLIST"
}

check_config_inputs
if [ -n "$RENDER_ONLY" ]; then
  mkdir -p "$RENDER_ONLY"
  write_config
  render_plist
  exit 0
fi

# ----------------------------------------------------------------------------------- the install

[ "$(uname -s)" = Darwin ] || die "not macOS: this installs a launchd agent; on Linux use the systemd units \
in deploy/linux, or --render-only DIR to only render the files"
[ "$(uname -m)" = arm64 ] || say "warning: not Apple Silicon: no Neural Engine, so the worker falls back to torch"

DOMAIN="gui/$(id -u)"
SERVICE="$DOMAIN/$LABEL"
launchctl print "$DOMAIN" >/dev/null 2>&1 || die "no login session for $(id -un): a LaunchAgent runs \
inside it. Log in at the Mac (or turn on automatic login, see deploy/README.md), then re-run"

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

find_python() {
  local candidate
  for candidate in "$PYTHON" python3.13 python3.12 python3.11 /opt/homebrew/bin/python3 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if [ -x "$VENV/bin/python" ]; then
  python_ok "$VENV/bin/python" || die "$VENV has a Python older than 3.11; remove it (rm -rf '$VENV') and re-run"
else
  if [ -n "$PYTHON" ] && ! python_ok "$PYTHON"; then
    die "--python $PYTHON is not a Python >= 3.11"
  fi
  py=$(find_python) || die "python3 >= 3.11 not found; brew install python@3.12 (or pass --python /path/to/python3.12)"
  say "creating $VENV with $py"
  mkdir -p "$(dirname "$VENV")"
  "$py" -m venv "$VENV"
fi

say "installing depthq from $REPO into $VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet --upgrade "$REPO"

write_config
mkdir -p "$WORKDIR" "$LOG_DIR"

if [ "$SKIP_MODEL" = 1 ]; then
  say "skipping the model download (--skip-model)"
else
  # Idempotent: a model already in model.cache_dir is kept, not fetched again.
  say "making sure the Core ML model $MODEL is present (about 1-2 GB the first time)"
  (cd "$WORKDIR" && "$VENV/bin/depthq" models download "$MODEL" --config "$CONFIG") ||
    die "depthq models download $MODEL failed (above); fix it, or copy a model into $PREFIX/models and use --skip-model"
fi

# Everything the worker needs, checked before launchd starts it: Redis, folders, the model (loaded once,
# which also leaves Core ML's compiled copy for the agent's first start). Exit 1 names the fix.
doctor_args=(doctor --config "$CONFIG")
[ "$SKIP_MODEL" = 1 ] && doctor_args+=(--no-model)
say "checking this Mac with depthq doctor"
(cd "$WORKDIR" && "$VENV/bin/depthq" "${doctor_args[@]}") ||
  die "depthq doctor found a problem (the FAIL lines above say how to fix it); fix it and run this again"

render_plist

stop_agent "$SERVICE" || true
# A service disabled earlier (launchctl disable) refuses to bootstrap.
launchctl enable "$SERVICE"
launchctl bootstrap "$DOMAIN" "$PLIST" || die "launchctl bootstrap $DOMAIN $PLIST failed (above)"
# Not `kickstart -k`: RunAtLoad has just started the worker, and -k would kill it while it loads the
# model. Without -k this only starts it if it is not running.
launchctl kickstart "$SERVICE"

say "installed: $SERVICE runs $VENV/bin/depthq work --config '$CONFIG'"
say "log: tail -f '$LOG_DIR/worker.log'    state: launchctl print $SERVICE | grep -E 'state|pid'"
