#!/usr/bin/env bash
# The test suite on another MPI than the Open MPI that `make test` uses, from PyPI's wheels:
#   scripts/test_other_mpi.sh mpich [pytest args]   MPICH (the base of Cray MPICH and MVAPICH)
#   scripts/test_other_mpi.sh impi [pytest args]    Intel MPI
# Each gets a venv of its own (.venv-mpich, .venv-impi) with that MPI's library and mpiexec,
# mpi4py, torch's CPU wheel and this package; Horovod is left out (one build serves one MPI), so
# its tests skip. E.g. scripts/test_other_mpi.sh impi tests/test_transport.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  mpich) WHEEL=mpich ;;
  impi) WHEEL=impi_rt==2021.15.0 ;;  # later impi_rt wheels need a libfabric wheel the package index did not offer
  *) echo "usage: $0 mpich|impi [pytest arguments]" >&2; exit 2 ;;
esac
VENV=".venv-$1"
shift
if [ ! -x "${VENV}/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "${VENV}"
  "${VENV}/bin/pip" install -q "${WHEEL}" mpi4py "${TORCH_SPEC:-torch==2.13.0}"  # torch: the CPU wheel, as in bootstrap.sh
  "${VENV}/bin/pip" install -q -e ".[dev]"
fi
export PATH="${PWD}/${VENV}/bin:${PATH}"  # this MPI's mpirun for the tests' launches
"${VENV}/bin/python" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])'
exec "${VENV}/bin/python" -m pytest "$@"
