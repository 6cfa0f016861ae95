"""Entry point of every test rank: ``python -m tests.worker module:function ARGS_JSON OUTDIR``."""
import importlib
import json
import sys
import traceback

from mpi4py import MPI


def main() -> None:
    target, args, outdir = sys.argv[1:4]
    module, function = target.split(":")
    rank = MPI.COMM_WORLD.Get_rank()
    try:
        result = getattr(importlib.import_module(module), function)(**json.loads(args))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)  # take the other ranks down instead of leaving them waiting
    with open(f"{outdir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
