"""``python -m hvd_unreliable.report DIR [DIR ...]``: Paper A's figure and a table from training runs.

Reads every job directory under the given directories (``summary.json`` + ``metrics.csv``, as
written by ``hvd_unreliable.train``), draws training loss vs epoch -- an RPS panel and a
gradient-allreduce panel, one curve per arrival rate, each with the reliable baseline -- to
``figure.png``, and writes ``report.md``: final training loss, test accuracy and consensus
distance per run. Outputs go to ``--out`` (default: the first directory).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import List

PANELS = (("rps", "RPS (model averaging)"), ("allreduce", "Gradient allreduce"))


def load_runs(dirs: List[Path]) -> List[dict]:
    runs = []
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"report: {d} is not a directory (expected a run or multirun directory)")
        for summary in sorted(d.rglob("summary.json")):
            metrics = summary.parent / "metrics.csv"
            if not metrics.is_file():
                continue
            with open(metrics) as f:
                rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
            info = json.loads(summary.read_text())
            runs.append({"dir": str(summary.parent), **info["config"], "rows": rows, "final": info["final"]})
    if not runs:
        raise SystemExit(f"report: no finished runs (summary.json + metrics.csv) under {', '.join(map(str, dirs))}")
    return sorted(runs, key=lambda r: (r["algorithm"], -r["arrival_rate"]))


def table(runs: List[dict]) -> str:
    lines = ["| algorithm | arrival rate | ranks | epochs | final train loss | test accuracy | consensus distance |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r["final"]
        rate = "-" if r["algorithm"] == "reliable" else f"{r['arrival_rate']:.2f}"
        lines.append(f"| {r['algorithm']} | {rate} | {r['ranks']} | {f['epoch']:.0f} | {f['train_loss']:.4f} | "
                     f"{f['test_acc']:.4f} | {f['consensus']:.2e} |")
    return "\n".join(lines)


def figure(runs: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    baseline = [r for r in runs if r["algorithm"] == "reliable"]
    for ax, (algo, title) in zip(axes, PANELS):
        mine = [r for r in runs if r["algorithm"] == algo]
        cmap = plt.get_cmap("viridis")
        for i, r in enumerate(mine):
            ax.plot([x["epoch"] for x in r["rows"]], [x["train_loss"] for x in r["rows"]],
                    color=cmap(i / max(len(mine) - 1, 1) * 0.85), label=f"{100 * r['arrival_rate']:.0f}% arrival")
        for r in baseline[:1]:
            ax.plot([x["epoch"] for x in r["rows"]], [x["train_loss"] for x in r["rows"]], "k--", label="reliable")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if mine or baseline:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("training loss (averaged model)")
    ax_max = max(x["train_loss"] for r in runs for x in r["rows"][1:] or r["rows"])
    axes[0].set_ylim(0, ax_max * 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories")
    ap.add_argument("--out", type=Path, help="where figure.png and report.md go (default: the first directory)")
    ap.add_argument("--no-figure", action="store_true", help="only the table")
    args = ap.parse_args(argv)
    runs = load_runs(args.dirs)
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    md = table(runs)
    (out / "report.md").write_text("# Training over a lossy network\n\n" + md + "\n")
    if not args.no_figure:
        figure(runs, out / "figure.png")
    print(md)
    print(f"\nwrote {out / 'report.md'}" + ("" if args.no_figure else f" and {out / 'figure.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
