"""Entry point of every test rank: ``python -m tests.worker CALLS_JSON OUTDIR``.

``CALLS_JSON`` maps a name to ``["module:function", {arguments}]``; the rank runs the calls one
after the other (a barrier between them, and no ``hvd_unreliable`` context carried from one to
the next) and writes ``{name: return value}`` to ``OUTDIR/rank<r>.json``. A call that raises
takes every rank down (MPI_Abort), its name and the error in the output and in
``OUTDIR/error<r>.txt`` (a launcher may drop what ranks print as it aborts them).
"""
import importlib
import json
import os
import sys
import traceback

from mpi4py import MPI


def main() -> None:
    calls, outdir = json.loads(sys.argv[1]), sys.argv[2]
    comm = MPI.COMM_WORLD
    results = {}
    for name, (target, args) in calls.items():
        module, function = target.split(":")
        try:
            results[name] = getattr(importlib.import_module(module), function)(**args)
            context = sys.modules.get("hvd_unreliable.integration.context")
            if context is not None:
                context.shutdown()  # (idempotent) the next call starts from no context, as in a fresh process
        except BaseException as e:
            # one write, the error first: another rank's MPI_Abort may end this process at once
            report = (f"rank {comm.Get_rank()}: call {name!r} ({target}) failed: {type(e).__name__}: {e}\n"
                      f"{traceback.format_exc()}")
            with open(f"{outdir}/error{comm.Get_rank()}.txt", "w") as f:  # (the launcher may lose output on abort)
                f.write(report)
            sys.stderr.flush()
            os.write(2, report.encode())
            comm.Abort(1)  # take the other ranks down instead of leaving them waiting
        comm.Barrier()
    with open(f"{outdir}/rank{comm.Get_rank()}.json", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
