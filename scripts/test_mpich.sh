#!/usr/bin/env bash
# The test suite on MPICH instead of the Open MPI that `make test` uses: MPICH is what Cray MPICH,
# Intel MPI and MVAPICH derive from. A venv of its own (.venv-mpich) holds PyPI's `mpich` wheel
# (MPICH's library and mpiexec) and mpi4py; Horovod is left out (one build serves one MPI), so
# its tests skip. Arguments go to pytest: scripts/test_mpich.sh tests/test_transport.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MPICH_VENV:-.venv-mpich}
if [ ! -x "${VENV}/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "${VENV}"
  "${VENV}/bin/pip" install -q mpich mpi4py "${TORCH_SPEC:-torch==2.13.0}"  # torch: the CPU wheel, as in bootstrap.sh
  "${VENV}/bin/pip" install -q -e ".[dev]"
fi
export PATH="${PWD}/${VENV}/bin:${PATH}"  # MPICH's mpirun for the tests' launches
"${VENV}/bin/python" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])'
exec "${VENV}/bin/python" -m pytest "$@"
