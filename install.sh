#!/usr/bin/env bash
# Install depthq from this checkout into a virtualenv (.venv beside this file), with the torch build
# this machine can use, so that the README's first command needs no choice from a newcomer.
#
# Which torch, and why: on Linux, PyPI's torch is the CUDA build (a 6 GB venv, 3.2 GB of it NVIDIA
# libraries), of no use without an NVIDIA GPU; PyTorch's CPU index has the same release without them
# (a venv of about 1.5 GB). So a Linux box whose nvidia-smi lists a GPU gets PyPI's torch, any other
# Linux box the CPU index's, and a Mac PyPI's (its only build: CPU and MPS). DEPTHQ_TORCH or --torch
# overrides the choice.
#
# Safe to re-run: it reuses the venv, and pip leaves what is already right alone. A venv that holds
# the other torch build (a CUDA one on a CPU-only box, from the README's old command) has it removed
# first, NVIDIA libraries included, since pip would keep an installed torch of the pinned version.
set -euo pipefail

# .ci/run's pin, so the service runs the torch the tests ran on. PyPI's Linux build of it is made on
# CUDA 13.0, whose runtime needs an NVIDIA driver 580 or newer.
TORCH_VERSION=2.13.0
MIN_DRIVER=580
CPU_INDEX=https://download.pytorch.org/whl/cpu
PYPI_INDEX=https://pypi.org/simple
# pyproject.toml's requires-python.
MIN_PYTHON=3.11

REPO=$(cd "$(dirname "$0")" && pwd)
ME=$(basename "$0")

usage() {
  cat <<EOF
Usage: bash $ME [--torch cpu|cuda|none] [--venv DIR] [--dry-run]

Creates DIR (default: .venv beside this script) with \$PYTHON (default: python3, $MIN_PYTHON or newer),
or reuses it, and installs depthq from this checkout into it (pip install -e '.[torch]'), with
torch $TORCH_VERSION built for this machine:

  Linux, nvidia-smi lists a GPU   the CUDA build, from PyPI (a venv of about 6 GB)
  Linux, otherwise                the CPU build, from $CPU_INDEX (about 1.5 GB)
  macOS                           PyPI's torch (CPU and MPS)

It prints what it chose and why. Re-run it at any time: it reuses the venv and swaps a torch of the
other build for the right one.

Options:
  --torch cpu|cuda|none  pick the build yourself (same as DEPTHQ_TORCH; the option wins):
                         cpu   the CPU build (on a Mac: PyPI's torch)
                         cuda  PyPI's CUDA build (Linux only), say for a GPU nvidia-smi cannot see yet
                         none  no torch: depthq alone (pip install -e .), for a Mac that runs Core ML
                               only, or a host that only watches the folder
  --venv DIR             the virtualenv to create or reuse (default: $REPO/.venv)
  --dry-run              print the choice and the commands, run none of them
  -h, --help             this text

Environment:
  DEPTHQ_TORCH           cpu, cuda or none, as --torch
  PYTHON                 the Python that creates the venv (default: python3)
EOF
}

say() { printf '%s: %s\n' "$ME" "$*"; }
die() {
  printf '%s: %s\n' "$ME" "$*" >&2
  exit 1
}

# Arguments as a shell would need them typed, so the printed plan can be pasted.
quoted() {
  local arg out=""
  for arg in "$@"; do
    case $arg in
      "" | *[!A-Za-z0-9_./:=+,@%-]*) arg="'${arg//\'/\'\\\'\'}'" ;;
    esac
    out="$out $arg"
  done
  printf '%s' "${out# }"
}

run() {
  printf '+ %s\n' "$(quoted "$@")"
  if [ "$DRY_RUN" = 0 ]; then
    "$@"
  fi
}

# ------------------------------------------------------------------------------------- arguments

TORCH=${DEPTHQ_TORCH:-}
TORCH_SOURCE="DEPTHQ_TORCH=$TORCH"
VENV=$REPO/.venv
DRY_RUN=0
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --torch)
      [ $# -ge 2 ] || die "--torch needs cpu, cuda or none"
      TORCH=$2
      TORCH_SOURCE="--torch $2"
      shift 2
      ;;
    --torch=*)
      TORCH=${1#--torch=}
      TORCH_SOURCE="--torch $TORCH"
      shift
      ;;
    --venv)
      [ $# -ge 2 ] || die "--venv needs a folder"
      VENV=$2
      shift 2
      ;;
    --venv=*)
      VENV=${1#--venv=}
      shift
      ;;
    --dry-run) DRY_RUN=1 && shift ;;
    *) die "unknown argument: $1 (bash $ME --help)" ;;
  esac
done
case $TORCH in
  "" | cpu | cuda | none) ;;
  *) die "$TORCH_SOURCE: expected cpu, cuda or none" ;;
esac
# pip runs from the checkout (for -e .), so a venv named from elsewhere must not move with it.
case $VENV in
  /*) ;;
  *) VENV=$PWD/$VENV ;;
esac

# ---------------------------------------------------------------------------------- which torch

OS=$(uname -s)
ARCH=$(uname -m)

# Sets GPUS to nvidia-smi's list and succeeds when it names a GPU; NO_GPU says why not otherwise.
# nvidia-smi ships with the driver (and is mounted into GPU containers), and answers only where the
# driver and a device are both usable; a driver loaded with no device given to this container, or a
# driver upgraded without a reboot, makes it fail, and the CUDA build would then be dead weight.
GPUS=""
NO_GPU=""
find_gpus() {
  local probe=(nvidia-smi -L)
  if ! command -v nvidia-smi >/dev/null; then
    NO_GPU="nvidia-smi not found"
    if [ -e /proc/driver/nvidia/version ]; then
      NO_GPU="$NO_GPU, though an NVIDIA driver is loaded (/proc/driver/nvidia/version)"
    fi
    return 1
  fi
  # A wedged GPU can keep nvidia-smi waiting for minutes.
  if command -v timeout >/dev/null; then
    probe=(timeout 30 "${probe[@]}")
  fi
  if ! GPUS=$("${probe[@]}" 2>&1); then
    NO_GPU="nvidia-smi -L failed: $(printf '%s' "$GPUS" | head -n 1)"
    return 1
  fi
  GPUS=$(printf '%s\n' "$GPUS" | grep '^GPU ' || true)
  if [ -z "$GPUS" ]; then
    NO_GPU="nvidia-smi -L lists no GPU"
    return 1
  fi
}

# A warning when the driver is older than PyPI's torch needs: it installs, but sees no GPU.
driver_warning() {
  local version
  version=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1) || return 0
  case ${version%%.*} in
    "" | *[!0-9]*) return 0 ;;
  esac
  if [ "${version%%.*}" -lt "$MIN_DRIVER" ]; then
    say "warning: NVIDIA driver $version: PyPI's torch $TORCH_VERSION is built on CUDA 13.0 and needs" \
      "driver $MIN_DRIVER or newer, or it runs on the CPU; upgrade the driver (or DEPTHQ_TORCH=cpu for the small build)"
  fi
}

# BUILD: cpu, cuda, mac or none; WHY: the reason, said with the choice.
WHY=""
if [ -n "$TORCH" ]; then
  BUILD=$TORCH
  WHY="$TORCH_SOURCE"
  if [ "$OS" = Darwin ]; then
    case $TORCH in
      cuda) die "$TORCH_SOURCE: there is no CUDA torch for macOS; use cpu (PyPI's torch, with MPS) or none" ;;
      cpu) BUILD=mac ;;
    esac
  fi
elif [ "$OS" = Linux ]; then
  if find_gpus; then
    BUILD=cuda
    WHY="nvidia-smi lists $(printf '%s\n' "$GPUS" | wc -l | tr -d ' ') GPU(s): $(printf '%s' "$GPUS" | head -n 1)"
  else
    BUILD=cpu
    WHY="no usable NVIDIA GPU ($NO_GPU)"
  fi
elif [ "$OS" = Darwin ]; then
  BUILD=mac
  WHY="macOS ($ARCH): PyPI's torch is the Mac build"
else
  BUILD=mac
  WHY="$OS: not Linux, so PyPI's torch as it is"
fi

TORCH_ARGS=()
case $BUILD in
  cuda)
    say "torch $TORCH_VERSION, the CUDA build from PyPI (a venv of about 6 GB): $WHY"
    if [ -n "$GPUS" ]; then
      driver_warning
    fi
    TORCH_ARGS=("torch==$TORCH_VERSION")
    ;;
  cpu)
    say "torch $TORCH_VERSION, the CPU build from $CPU_INDEX (a venv of about 1.5 GB): $WHY"
    # Every torch from the CPU index carries +cpu, which sorts above PyPI's CUDA build of the same
    # release, so pip takes it; PyPI still serves torch's own requirements.
    TORCH_ARGS=("torch==$TORCH_VERSION" --index-url "$CPU_INDEX" --extra-index-url "$PYPI_INDEX")
    ;;
  mac)
    say "torch $TORCH_VERSION from PyPI (CPU and MPS): $WHY"
    TORCH_ARGS=("torch==$TORCH_VERSION")
    ;;
  none)
    say "no torch, depthq alone (a Core ML Mac, or a host that only watches): $WHY"
    ;;
esac
[ -n "$TORCH" ] || say "to choose yourself: DEPTHQ_TORCH=cpu|cuda|none bash $ME"

# ---------------------------------------------------------------------------------------- venv

PYTHON=${PYTHON:-python3}
# Fails with the reason for any Python older than MIN_PYTHON, or one that does not run.
check_python() {
  local version
  version=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || die "$2 does not run as a Python"
  "$1" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" \
    || die "$2 is Python $version; depthq needs $MIN_PYTHON or newer ($3)"
}

# Debian and Ubuntu split venv's pip out of Python (python3-venv): without it, `-m venv` fails
# halfway and leaves a venv with no pip, which a re-run must not take for a good one.
NO_VENV_MODULE="on Debian and Ubuntu, apt install python3-venv"
VPY=$VENV/bin/python
if [ -x "$VPY" ]; then
  check_python "$VPY" "$VPY" "remove the venv, rm -rf '$VENV', and run this again"
  "$VPY" -m pip --version >/dev/null 2>&1 \
    || die "$VENV has no pip, as a venv made without python3-venv; rm -rf '$VENV' and run this again ($NO_VENV_MODULE)"
  say "reusing $VENV"
else
  command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH; install Python $MIN_PYTHON or newer, or set PYTHON"
  check_python "$PYTHON" "$PYTHON" "set PYTHON to a newer one"
  run "$PYTHON" -m venv "$VENV" || die "could not create $VENV ($NO_VENV_MODULE); rm -rf '$VENV' and run this again"
fi

# The torch in the venv, if it is the other build (a CUDA build ships libtorch_cuda, a CPU one does
# not); nothing when there is none or it is the right one. With a CUDA build go the NVIDIA packages
# it pulled in, so that replacing it frees their 3 GB.
STALE=()
if [ -x "$VPY" ] && [ "$BUILD" != none ] && [ "$BUILD" != mac ]; then
  read -r -a STALE < <("$VPY" - "$BUILD" <<'EOF'
import importlib.metadata as md
import re
import sys

try:
    torch = md.distribution("torch")
except md.PackageNotFoundError:
    sys.exit()
built_for_cuda = torch.locate_file("torch/lib/libtorch_cuda.so").exists()
if built_for_cuda == (sys.argv[1] == "cuda"):
    sys.exit()
names = ["torch"]
if built_for_cuda:
    for dist in md.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if name.startswith(("nvidia-", "cuda-")) or name == "triton":
            names.append(name)
print(" ".join(sorted(set(names))))
EOF
  ) || true
fi
if [ ${#STALE[@]} -gt 0 ]; then
  say "$VENV holds another build of torch; removing it first: ${STALE[*]}"
  run "$VPY" -m pip uninstall -y "${STALE[@]}"
fi

# -------------------------------------------------------------------------------------- install

cd "$REPO"
# torch first, from its own index; then depthq, whose torch requirement it already meets, so the
# second call never looks for torch anywhere else.
if [ ${#TORCH_ARGS[@]} -gt 0 ]; then
  run "$VPY" -m pip install "${TORCH_ARGS[@]}"
  run "$VPY" -m pip install -e '.[torch]'
else
  run "$VPY" -m pip install -e .
fi

# nvidia-smi seeing a GPU does not prove this torch can use it (a driver too old for its CUDA, or a
# CPU build that a local wheel cache preferred): ask torch itself, as the worker will.
SEES_GPU='
import sys

import torch

if torch.cuda.is_available():
    print(f"torch {torch.__version__} sees {torch.cuda.device_count()} GPU(s)")
else:
    cuda = torch.version.cuda or "none: a CPU build"
    print(f"torch {torch.__version__} (CUDA {cuda}) sees no GPU")
    sys.exit(1)
'
if [ "$DRY_RUN" = 0 ] && [ "$BUILD" = cuda ]; then
  if seen=$("$VPY" -c "$SEES_GPU" 2>&1); then
    say "$seen"
  else
    say "warning: $(printf '%s' "$seen" | tail -n 1); the worker would run on the CPU (depthq doctor says more)"
  fi
fi

if [ "$DRY_RUN" = 1 ]; then
  say "dry run: nothing was changed"
else
  say "done: $VENV/bin/depthq up --watch inbox --output depth-out (depthq doctor says what this machine would do)"
fi
