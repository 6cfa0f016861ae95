#!/usr/bin/env bash
# One-shot, idempotent set-up used by `make demo`, `make test` and the Docker images.
#
#   MPI      the MPI on PATH (mpicc + mpirun), else Open MPI from the distribution (apt-get);
#            and the ShellCheck linter when apt-get is there (the job-script tests use it).
#   .venv    torch (CPU wheel unless one is importable), numpy, mpi4py built against that MPI,
#            hydra-core, Horovod 0.28.1 (PyTorch + MPI + Gloo, C++17 patch, wheel cached),
#            and this package in editable mode with its dev extras.
#
# Environment knobs:
#   VENV=.venv                 where the virtual environment lives
#   PYTHON=python3             interpreter that creates it
#   TORCH_SPEC=torch==2.13.0   pip arguments to install torch when none is importable (keep it a
#                              CPU wheel on CPU machines; a bare `torch` pulls GBs of CUDA packages)
#   HOROVOD_VERSION=0.28.1     Horovod sdist to patch and build
#   HVDU_CACHE=~/.cache/hvd_unreliable   where built Horovod wheels are kept between runs
#   HVDU_SKIP_HOROVOD=1        set up without Horovod (the plugin then runs on mpi4py alone)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
HVDU_CACHE="${HVDU_CACHE:-$HOME/.cache/hvd_unreliable}"
LOG_DIR="$(mktemp -d)"
trap 'rm -rf "$LOG_DIR"' EXIT

# step NAME CMD...: run CMD quietly, print its duration, dump its output and stop if it fails.
step() {
  local name="$1"; shift
  local log
  log="$LOG_DIR/$(echo "$name" | tr -c 'a-zA-Z0-9' '_').log"
  local t0=$SECONDS
  printf '[bootstrap] %-44s ' "$name"
  local rc=0
  set +e
  ( set -e; "$@" ) >"$log" 2>&1  # a subshell, so that errexit also applies inside functions
  rc=$?
  set -e
  if [ "$rc" = 0 ]; then
    printf 'ok (%ds)\n' "$((SECONDS - t0))"
  else
    printf 'FAILED (exit %d after %ds)\n' "$rc" "$((SECONDS - t0))"
    echo "----- output of '$name' (last 80 lines) -----" >&2
    tail -n 80 "$log" >&2
    exit "$rc"
  fi
}
skip() { printf '[bootstrap] %-44s %s\n' "$1" "$2"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "need root (or sudo) to run: $*" >&2; return 1; fi; }

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update
  as_root apt-get install -y --no-install-recommends "$@"
}

# --- system packages: MPI (when none is on PATH), shellcheck (checks rendered job scripts) ------
APT_PACKAGES=()
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
  skip "MPI" "found $(command -v mpirun)"
else
  command -v apt-get >/dev/null || { echo "No MPI on PATH and no apt-get: install an MPI (mpicc, mpirun) first." >&2; exit 1; }
  APT_PACKAGES+=(openmpi-bin libopenmpi-dev)
fi
if ! command -v shellcheck >/dev/null && command -v apt-get >/dev/null; then
  APT_PACKAGES+=(shellcheck)
fi
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
  step "apt-get install ${APT_PACKAGES[*]}" apt_install "${APT_PACKAGES[@]}"
fi

# --- virtual environment ------------------------------------------------------------------------
if [ -x "$VENV/bin/python" ]; then
  skip "virtual environment" "$VENV"
else
  step "create virtual environment" "$PYTHON" -m venv "$VENV"
  step "upgrade pip, setuptools, wheel" "$VENV/bin/python" -m pip install -U pip setuptools wheel
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

if "$PY" -c 'import torch' 2>/dev/null; then
  skip "torch" "$("$PY" -c 'import torch; print(torch.__version__)')"
else
  read -ra TORCH_ARGS <<< "$TORCH_SPEC"  # e.g. "torch==2.5.1 --index-url https://.../cu124"
  step "install $TORCH_SPEC" "${PIP[@]}" "${TORCH_ARGS[@]}"
fi

# mpi4py is compiled against the MPI on PATH so that it loads the same libmpi as Horovod.
if "$PY" -c 'import mpi4py, numpy, hydra, cmake, psutil, yaml, cloudpickle, packaging' 2>/dev/null; then
  skip "numpy, mpi4py, hydra-core, build tools" "present"
else
  step "install numpy, mpi4py (from source), hydra" \
    "${PIP[@]}" --no-binary mpi4py "mpi4py>=3.1" numpy "hydra-core>=1.3" \
    cmake psutil pyyaml cloudpickle packaging
fi

# --- Horovod -------------------------------------------------------------------------------------
# Horovod 0.28.1's sdist sets CMAKE_CXX_STANDARD 14; torch >= 2.1 headers need C++17. Upstream
# fixed this after the release (PR #3998) but never published it, so we patch the two CMakeLists.
# GCC >= 13 no longer pulls <string>/<stdexcept>/<cstdint> in transitively, which some of its
# headers rely on (group_table.h, common.h): they are force-included (harmless on older GCC).
build_horovod() {
  local dest="$1" work
  work="$(mktemp -d)"
  "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
  tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
  local src="$work/horovod-$HOROVOD_VERSION"
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
  HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI \
  CXXFLAGS="${CXXFLAGS:-} -include cstdint -include string -include stdexcept" MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src"
  mkdir -p "$dest"
  cp "$work"/dist/horovod-*.whl "$dest/"
  rm -rf "$work"
}

if [ "${HVDU_SKIP_HOROVOD:-0}" = 1 ]; then
  skip "Horovod" "skipped (HVDU_SKIP_HOROVOD=1)"
elif "$PY" -c "import horovod, horovod.torch; assert horovod.__version__ == '$HOROVOD_VERSION'" 2>/dev/null; then
  skip "Horovod" "$HOROVOD_VERSION present"
else
  # The wheel is only valid for the torch, MPI and Python it was compiled against.
  KEY="$("$PY" - <<'PY'
import re, sys, torch
from mpi4py import MPI
lib = re.sub(r"[^A-Za-z0-9.]+", "_", MPI.Get_library_version().replace("\0", "").splitlines()[0])[:40]
print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{lib}".replace("+", "_"))
PY
)"
  WHEEL_DIR="$HVDU_CACHE/horovod-$HOROVOD_VERSION/$KEY"
  if ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    skip "Horovod wheel" "cached in $WHEEL_DIR"
  else
    step "build Horovod $HOROVOD_VERSION (C++17 patch, ~6 min)" build_horovod "$WHEEL_DIR"
  fi
  step "install Horovod wheel" "${PIP[@]}" --no-deps "$WHEEL_DIR"/horovod-*.whl
fi

# --- this package -----------------------------------------------------------------------------------
# (installing builds the C extensions in place: the exchange's hot path, hvd_unreliable/transport/_native.c,
# and Bernoulli's loss decisions, hvd_unreliable/faults/_decide.c)
installed_is_current() {  # the install is newer than setup.py and every extension's C source
  local f
  for f in "$ROOT/setup.py" "$ROOT"/hvd_unreliable/*/_*.c; do
    [ "$f" -ot "$VENV/.hvdu-installed" ] || return 1
  done
}
if "$PY" -c 'import hvd_unreliable.transport._native, hvd_unreliable.faults._decide, pytest' 2>/dev/null \
    && installed_is_current; then
  skip "hvd_unreliable (editable, dev extras)" "present"
else
  step "install hvd_unreliable (editable, dev extras)" "${PIP[@]}" -e "${ROOT}[dev]"
  touch "$VENV/.hvdu-installed"
fi

printf '[bootstrap] done in %ds; python: %s\n' "$SECONDS" "$PY"
