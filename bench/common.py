"""Shared helpers of the benchmarks: run this script's rank part under mpirun, time, tabulate."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvd_unreliable.launch import launcher_env, mpirun_command  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def run_ranks(script: str, np: int, args: List[str], timeout: int = 1800) -> dict:
    """Run ``script --rank OUT ARGS`` on ``np`` ranks; return what rank 0 wrote to OUT."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = mpirun_command(np) + [sys.executable, script, "--rank", str(out), *args]
        subprocess.run(cmd, check=True, env=dict(launcher_env(), OMP_NUM_THREADS="1"), timeout=timeout)
        return json.loads(out.read_text())


def warm_up(fns: Dict[str, Callable[[], None]], rounds: int) -> None:
    """Call every function ``rounds`` times, untimed: what it sets up once is then in place."""
    for _ in range(rounds):
        for fn in fns.values():
            fn()


def interleaved_times(fns: Dict[str, Callable[[], None]], comm, repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median (over ``repeats`` rounds) of the slowest rank's time for one call of each function,
    after ``warmup`` untimed calls of each.

    The functions run in turn within every round, so all of them see the same machine state:
    their ratios are meaningful even on a noisy, oversubscribed box. The order is shuffled from
    round to round (the same on every rank), so that what one function leaves in the caches
    does not always favour or burden the same other one.
    """
    from mpi4py import MPI

    samples: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    warm_up(fns, warmup)
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            fn = fns[name]
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            samples[name].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def table(rows: List[dict], columns: List[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line([fmt(r[c]) for c in columns]) for r in rows])


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def size_label(nbytes: int) -> str:
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"


def save_rank_rows(out: str, rows: List[dict], comm) -> None:
    """Rank 0 hands its rows to the parent process (see :func:`run_ranks`)."""
    if comm.Get_rank() == 0:
        Path(out).write_text(json.dumps(rows))


def runs_side_by_side(runs: List[List[dict]], keys: List[str], compared: List[str]) -> List[dict]:
    """One row per case: its ``compared`` columns in every run, joined as "a / b / c" (first run first)."""
    out = []
    for rows in zip(*runs):
        row = {k: rows[0][k] for k in keys}
        row.update({c: " / ".join(f"{x[c]:.2f}" for x in rows) for c in compared})
        out.append(row)
    return out


def report_runs(script: str, name: str, runs: List[List[dict]], columns: List[str], keys: List[str],
                compared: List[str]) -> int:
    """Print the last run's table and, with several runs, their ``compared`` columns side by side;
    write the JSON (``rows``: the last run, ``runs``: all of them)."""
    print(table(runs[-1], columns))
    if len(runs) > 1:
        print(f"\n{len(runs)} runs side by side (the table above is the last):")
        print(table(runs_side_by_side(runs, keys, compared), keys + compared))
    path = write(name, {"command": f"python bench/{Path(script).name} " + " ".join(sys.argv[1:]),
                        "rows": runs[-1], "runs": runs})
    print(f"\nwrote {path}")
    return 0


def collect_and_report(script: str, name: str, nps: List[int], rank_args: List[str], columns: List[str],
                       runs: int = 1, keys: List[str] = (), compared: List[str] = ()) -> int:
    """Run ``script``'s rank part at every world size in ``nps`` (``runs`` times over); report."""
    results = [[row for np_ in nps for row in run_ranks(script, np_, rank_args)] for _ in range(runs)]
    return report_runs(script, name, results, columns, list(keys), list(compared))


def size_sweep_main(doc: str, script: str, name: str, rank_main: Callable[..., None], columns: List[str],
                    compared: List[str] = (), against: List[str] = (),
                    reference_modules: Sequence[str] = ("faults", "transport")) -> int:
    """Command line of the benchmarks that sweep message sizes: ``[--np 2 4] [--max-mib 64] [--runs N]
    [--against REV]``; ``rank_main(out, max_mib, reference)`` gets :func:`load_reference`'s package
    with ``reference_modules`` (or ``None``) for ``--against``, which adds the columns ``against``
    to the table."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", help=argparse.SUPPRESS)
    ap.add_argument("--np", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--max-mib", type=whole_number("--max-mib"), default=64)
    ap.add_argument("--runs", type=runs_count, default=1,
                    help="repeat the whole sweep; prints the ratios of every run side by side")
    add_against_arguments(ap)
    args = ap.parse_args()
    if args.rank:
        rank_main(args.rank, args.max_mib, args.reference_dir and load_reference(args.reference_dir, reference_modules))
        return 0
    if args.against:
        columns, compared = [*columns, *against], [*compared, *against]
    with reference_rank_args(args.against) as reference:
        return collect_and_report(script, name, args.np, ["--max-mib", str(args.max_mib), *reference], columns,
                                  args.runs, columns[:2], compared)


def add_against_arguments(ap) -> None:
    """``--against REV``, and the hidden ``--reference-dir`` through which the ranks get REV's package."""
    import argparse

    ap.add_argument("--against", metavar="REV",
                    help="also time the package as it is at git revision REV, side by side in the same rounds")
    ap.add_argument("--reference-dir", help=argparse.SUPPRESS)


@contextmanager
def reference_rank_args(rev: Optional[str]):
    """The rank arguments that hand the ranks the package as it is at git revision ``rev``
    (exported to a temporary folder for the duration of the block); ``[]`` without ``rev``."""
    with tempfile.TemporaryDirectory() as tmp:
        if rev:
            export_revision(rev, tmp)
        yield ["--reference-dir", tmp] if rev else []


def export_revision(rev: str, folder: str) -> None:
    """Write ``hvd_unreliable/`` as it is at git revision ``rev`` into ``folder``, with its C
    extension built in place where it has one (as ``pip install -e`` builds the working tree's)."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "hvd_unreliable", "setup.py", "README.md"],
                                 check=True, capture_output=True).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"--against {rev!r}: git cannot export hvd_unreliable/ at that revision: {e.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    if (Path(folder) / "hvd_unreliable" / "transport" / "_native.c").exists():
        built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=folder,
                               capture_output=True, text=True)
        if built.returncode:
            sys.exit(f"--against {rev!r}: its C extension did not build:\n{built.stdout[-2000:]}{built.stderr[-2000:]}")


def load_reference(folder: str, modules: Sequence[str]):
    """The package :func:`export_revision` wrote to ``folder``, imported as ``hvd_unreliable_ref``
    beside the working tree's ``hvd_unreliable`` (its relative imports stay inside it), with its
    submodules ``modules`` (e.g. ``"transport"``) imported as its attributes. (Its lazy top-level
    names would load the working tree's modules.)"""
    import importlib
    import importlib.util

    pkg = Path(folder) / "hvd_unreliable"
    spec = importlib.util.spec_from_file_location("hvd_unreliable_ref", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = sys.modules["hvd_unreliable_ref"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in modules:
        importlib.import_module(f"hvd_unreliable_ref.{name}")
    return module


def whole_number(flag: str) -> Callable[[str], int]:
    """An argparse ``type`` for ``flag``: a whole number >= 1, or an error naming the flag and value."""
    import argparse

    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{flag}={text!r}: expected a whole number >= 1")
        return int(text)
    return parse


runs_count = whole_number("--runs")
