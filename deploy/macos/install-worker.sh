#!/usr/bin/env bash
# Install or update the depthq worker on a Mac mini: a venv, a config file, the Core ML model and a
# launchd LaunchAgent that starts `depthq work` at login and restarts it whenever it exits.
#
# Safe to re-run: it stops the agent first (the worker finishes the photo in hand), so the venv is
# never upgraded under a running worker and the doctor's model load never runs beside the worker's;
# then it updates the venv from this checkout, re-renders the agent and starts it again. It never
# overwrites an existing config file. Written for macOS's own bash 3.2.
#
# The venv's Python must be one that coremltools ships its native libraries for (SUPPORTED_PYTHONS
# below): with any other, coremltools installs without them, cannot read a Core ML model, and the
# worker falls back to torch. Without --python, the newest supported Python is picked, looked for by
# full path in Homebrew too, since a non-login SSH shell has no Homebrew on PATH.
#
# Environment:
#   DEPTHQ_BREW_PREFIXES  Homebrew prefixes to look for Pythons in, separated by colons as in PATH
#                         (default: /opt/homebrew:/usr/local); the tests point it at stand-ins.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
. "$(dirname "$0")/common.sh"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
TEMPLATE="$REPO/deploy/macos/$LABEL.plist"

# ---------------------------------------------------------------------------------------- Python

# The Pythons that coremltools 9.0 (pyproject.toml's minimum, and the newest release) ships macOS
# arm64 wheels for, with its native libraries libcoremlpython and libmodelpackage: cp310 to cp313 on
# PyPI. For 3.14 there is only the source, which pip installs without them. depthq needs >= 3.11.
# Newest first. Widen it only when a coremltools release has wheels for more.
SUPPORTED_PYTHONS="3.13 3.12 3.11"
BREW_PREFIXES=${DEPTHQ_BREW_PREFIXES:-/opt/homebrew:/usr/local}
NEWEST_PYTHON=${SUPPORTED_PYTHONS%% *}

# "3.13, 3.12 or 3.11", for messages.
supported_list() {
  local rest=${SUPPORTED_PYTHONS% *}
  printf '%s or %s' "$(printf '%s' "$rest" | sed 's/ /, /g')" "${SUPPORTED_PYTHONS##* }"
}

# A Python's major.minor ("3.13"); fails for anything that does not run as a Python.
python_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

is_supported_version() {
  case " $SUPPORTED_PYTHONS " in
    *" $1 "*) return 0 ;;
    *) return 1 ;;
  esac
}

# Where to look, newest version first: PATH, then Homebrew's and python.org's by full path, since a
# non-login SSH shell (ssh mac 'deploy/...') has no /opt/homebrew/bin on PATH. Last, plain python3.
python_candidates() {
  local version
  for version in $SUPPORTED_PYTHONS; do
    printf '%s\n' "python$version"
    brew_pythons "$version"
    printf '%s\n' "/Library/Frameworks/Python.framework/Versions/$version/bin/python$version"
  done
  printf '%s\n' python3
}

# Homebrew's Python $1 in each prefix: its bin/ link, and the keg's own (there even when unlinked).
brew_pythons() {
  local prefix IFS=:
  for prefix in $BREW_PREFIXES; do
    printf '%s\n' "$prefix/bin/python$1" "$prefix/opt/python@$1/bin/python$1"
  done
}

# Sets FOUND_PYTHON to the first supported candidate; REJECTED lists the Pythons passed over and why.
FOUND_PYTHON=""
REJECTED=""
find_python() {
  local candidate path version
  while IFS= read -r candidate; do
    path=$(command -v "$candidate" 2>/dev/null) || continue
    if ! version=$(python_version "$path"); then
      REJECTED="$REJECTED $path (does not run);"
    elif is_supported_version "$version"; then
      FOUND_PYTHON=$path
      return 0
    else
      REJECTED="$REJECTED $path ($version);"
    fi
  done <<EOF
$(python_candidates)
EOF
  return 1
}

how_to_get_python() {
  printf 'brew install python@%s (Homebrew: https://brew.sh), then re-run (or pass --python %s)' \
    "$NEWEST_PYTHON" "$(brew_prefix)/bin/python$NEWEST_PYTHON"
}

# The first Homebrew prefix there is (/usr/local on an Intel Mac), else the first listed.
brew_prefix() {
  local prefix IFS=:
  for prefix in $BREW_PREFIXES; do
    if [ -d "$prefix" ]; then
      printf '%s' "$prefix"
      return
    fi
  done
  printf '%s' "${BREW_PREFIXES%%:*}"
}

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
  --log-dir DIR          where the logs go (default: ~/Library/Logs/depthq): depthq-worker.log,
                         rotated by depthq (config.yaml's logging section), and worker.log, launchd's
                         file for what escapes it (a crash, a stack dump), which nothing rotates
  --log-level LEVEL      DEBUG, INFO or WARNING (default: INFO)
  --python PYTHON        the Python to build the venv with: $(supported_list) (default: the newest
                         found); coremltools has no native libraries for the others
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
    -e "$(substitution __LOG_FILE__ "$(yaml_quote "$LOG_DIR/depthq-worker.log")")" \
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

# Every check that can refuse comes before the agent stops: a refusal leaves the running worker alone.
PY=""
if [ -n "$PYTHON" ]; then
  PY=$(command -v "$PYTHON" 2>/dev/null) || die "--python $PYTHON: no such program"
  version=$(python_version "$PY") || die "--python $PYTHON does not run as a Python"
  is_supported_version "$version" || die "--python $PYTHON is Python $version; coremltools 9.0 ships its \
native libraries (needed to read a Core ML model) only for Python $(supported_list). $(how_to_get_python)"
fi
if [ -x "$VENV/bin/python" ]; then
  # A venv whose Python was uninstalled no longer runs: a clear message, not a bare "not supported".
  version=$(python_version "$VENV/bin/python") || die "$VENV/bin/python does not run (was the Python it \
was made with removed?). Remove the venv (rm -rf '$VENV') and re-run"
  is_supported_version "$version" || die "$VENV has Python $version, which coremltools 9.0 has no native \
libraries for (the worker could not read a Core ML model). Remove it (rm -rf '$VENV') and re-run: a new venv \
gets Python $(supported_list)"
  [ -z "$PYTHON" ] || say "note: $VENV exists, so --python is not used (remove the venv to rebuild it)"
  PY=""
elif [ -z "$PY" ]; then
  find_python || die "no Python $(supported_list) found${REJECTED:+ (passed over:$REJECTED)}: coremltools \
9.0 ships its native libraries only for those. $(how_to_get_python)"
  PY=$FOUND_PYTHON
fi

# The venv is about to change and the doctor loads a second model: neither beside a running worker.
AGENT_STOPPED=0
if stop_agent "$SERVICE"; then
  AGENT_STOPPED=1
fi
AGENT_STARTED=0
# On a failure from here on, say that the worker is stopped (it was running before) and how to start it.
report_stopped_agent() {
  [ "$AGENT_STOPPED" = 1 ] && [ "$AGENT_STARTED" = 0 ] || return 0
  say "the worker is stopped: fix the error above and re-run this script (to start it meanwhile, as" \
    "installed now: launchctl bootstrap $DOMAIN '$PLIST')" >&2
}
trap report_stopped_agent EXIT

if [ -n "$PY" ]; then
  say "creating $VENV with $PY (Python $(python_version "$PY"))"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi

say "installing depthq from $REPO into $VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet --upgrade "$REPO"
# Without these two, coremltools cannot read a model's spec, `auto` picks torch (not installed here),
# and the doctor would blame the model.
"$VENV/bin/python" -c 'import coremltools.libcoremlpython, coremltools.libmodelpackage' ||
  die "coremltools in $VENV has no native libraries (the import above failed), so the worker cannot \
read a Core ML model. Its Python is $(python_version "$VENV/bin/python"); coremltools 9.0 ships them for \
Python $(supported_list). Remove the venv (rm -rf '$VENV') and re-run; $(how_to_get_python)"

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

# A service disabled earlier (launchctl disable) refuses to bootstrap.
launchctl enable "$SERVICE"
launchctl bootstrap "$DOMAIN" "$PLIST" || die "launchctl bootstrap $DOMAIN $PLIST failed (above)"
# Not `kickstart -k`: RunAtLoad has just started the worker, and -k would kill it while it loads the
# model. Without -k this only starts it if it is not running.
launchctl kickstart "$SERVICE"
AGENT_STARTED=1

say "installed: $SERVICE runs $VENV/bin/depthq work --config '$CONFIG'"
say "log: tail -f '$LOG_DIR/depthq-worker.log' (crashes and stack dumps: '$LOG_DIR/worker.log')"
say "state: launchctl print $SERVICE | grep -E 'state|pid'"
