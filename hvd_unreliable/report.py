"""``python -m hvd_unreliable.report DIR [DIR ...]``: the papers' figures and tables from training runs.

Reads every job directory under the given directories, as written by ``hvd_unreliable.train``:

* Paper A runs (``summary.json`` + ``metrics.csv``): training loss vs epoch -- an RPS panel and a
  gradient-allreduce panel, one curve per arrival rate (and number of servers, where runs differ
  in it), each with the reliable baseline -- to ``figure.png``; final training loss, test accuracy
  and consensus distance per run. Runs that differ in their seed only are one row and one curve:
  the mean over their seeds.
* Parameter-server runs of Paper B (``summary.json`` + ``evals.csv``): training loss vs
  wall-clock time, one curve per run, to ``figure_ps.png``; time per update next to Paper B's
  formula, final loss and mean staleness per run.

The tables go to ``report.md``. Outputs go to ``--out`` (default: the first directory).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import List, Tuple

PANELS = (("rps", "RPS (model averaging)"), ("allreduce", "Gradient allreduce"))


def load_runs(dirs: List[Path]) -> Tuple[List[dict], List[dict]]:
    """The finished runs under ``dirs``: (Paper A runs, parameter-server runs)."""
    runs, ps_runs, seen = [], [], set()
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"report: {d} is not a directory (expected a run or multirun directory)")
        for summary in sorted(d.rglob("summary.json")):
            if summary.resolve() in seen:  # under two of the directories given
                continue
            seen.add(summary.resolve())
            info = json.loads(summary.read_text())
            run = {"dir": str(summary.parent), **info["config"], "final": info.get("final"), "ps": info.get("ps")}
            if "run" in info:  # everything the run computes (its checkpoints' identity) but the seed
                run["setup"] = json.dumps({k: v for k, v in info["run"].items() if k != "seed"}, sort_keys=True)
            else:  # a summary from before runs kept their identity: a group of its own
                run.update(setup=run["dir"], servers=run.get("servers", run.get("ranks")))
            found, name = (ps_runs, "evals.csv") if run["ps"] else (runs, "metrics.csv")
            if (summary.parent / name).is_file():  # (not yet there while a run is going)
                run["rows"] = _read_csv(summary.parent / name)
                found.append(run)
    if not runs and not ps_runs:
        raise SystemExit(f"report: no finished runs (summary.json with metrics.csv or evals.csv) under "
                         f"{', '.join(map(str, dirs))}")
    return (sorted(runs, key=lambda r: (r["algorithm"], -r["arrival_rate"], r["servers"], r.get("seed") or 0)),
            sorted(ps_runs, key=lambda r: (r["algorithm"], r["k"], r["lr_rule"], -r["arrival_rate"])))


def _read_csv(path: Path) -> List[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def seed_groups(runs: List[dict]) -> List[List[dict]]:
    """The runs, those that differ in their seed only (and ran as many epochs) together."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["setup"], r["final"]["epoch"], len(r["rows"])), []).append(r)
    return list(groups.values())


def _mean(group: List[dict], key: str) -> float:
    return sum(r["final"][key] for r in group) / len(group)


def table(runs: List[dict]) -> str:
    groups = seed_groups(runs)
    servers = any(r["servers"] != r["ranks"] for r in runs)  # a column only where runs differ in it
    seeds = any(len(g) > 1 for g in groups)
    cols = ["algorithm", "arrival rate", "ranks"] + ["servers"] * servers + ["seeds"] * seeds + ["epochs"]
    what = [w + " (mean)" * seeds for w in ("final train loss", "test accuracy", "consensus distance")]
    what += ["consensus distance (range)"] * seeds  # over the seeds: how much a run depends on its draws
    lines = ["| " + " | ".join(cols + what) + " |", "|---" * (len(cols) + len(what)) + "|"]
    for g in groups:
        r = g[0]
        rate = "-" if r["algorithm"] == "reliable" else f"{r['arrival_rate']:.2f}"
        cells = [r["algorithm"], rate, str(r["ranks"])] + [rate if rate == "-" else str(r["servers"])] * servers
        cells += [str(len(g))] * seeds
        cells += [f"{r['final']['epoch']:.0f}", f"{_mean(g, 'train_loss'):.4f}", f"{_mean(g, 'test_acc'):.4f}",
                  f"{_mean(g, 'consensus'):.2e}"]
        cs = [x["final"]["consensus"] for x in g]
        cells += [f"{min(cs):.2e} - {max(cs):.2e}"] * seeds
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ps_table(runs: List[dict]) -> str:
    lines = ["| variant | K | learners | lr rule | arrival rate | updates | time per update (s) | theory (s) | "
             "final loss | test accuracy | mean staleness |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        p = r["ps"]
        hist = {int(s): c for s, c in p["staleness_histogram"].items()}
        stale = sum(s * c for s, c in hist.items()) / max(1, sum(hist.values()))
        theory = "-" if p["theory_update_s"] is None else f"{p['theory_update_s']:.4f}"
        lines.append(f"| {r['algorithm']} | {r['k']} | {r['learners']} | {r['lr_rule']} | {r['arrival_rate']:.2f} | "
                     f"{p['updates']} | {p['mean_update_s']:.4f} | {theory} | {p['final_loss']:.4f} | "
                     f"{p['final_test_acc']:.4f} | {stale:.2f} |")
    return "\n".join(lines)


def _ps_label(r: dict) -> str:
    lossy = f", {100 * r['arrival_rate']:.0f}% arrival" if r["arrival_rate"] < 1 else ""
    return f"{r['algorithm']} K={r['k']}, {r['lr_rule']} lr{lossy}"


def ps_figure(curves: List[Tuple[str, List[dict]]], path: Path, title: str) -> None:
    """Training loss vs wall-clock time, one ``(label, evals.csv rows)`` curve each (Paper B's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, rows in curves:
        ax.plot([e["time"] for e in rows], [e["loss"] for e in rows], label=label)
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(runs: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(r["algorithm"] == p[0] for r in runs)] or PANELS[:1]  # (reliable alone)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    groups = seed_groups(runs)
    servers = any(r["servers"] != r["ranks"] for r in runs)

    def curve(group: List[dict]):  # training loss vs epoch, the mean over the group's seeds
        return ([x["epoch"] for x in group[0]["rows"]],
                [sum(r["rows"][i]["train_loss"] for r in group) / len(group) for i in range(len(group[0]["rows"]))])

    baseline = [g for g in groups if g[0]["algorithm"] == "reliable"]
    for ax, (algo, title) in zip(axes, panels):
        mine = [g for g in groups if g[0]["algorithm"] == algo]
        cmap = plt.get_cmap("viridis")
        for i, g in enumerate(mine):
            label = f"{100 * g[0]['arrival_rate']:.0f}% arrival" + (f", S = {g[0]['servers']}" if servers else "")
            ax.plot(*curve(g), color=cmap(i / max(len(mine) - 1, 1) * 0.85), label=label)
        for g in baseline[:1]:
            ax.plot(*curve(g), "k--", label="reliable")
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
    ap.add_argument("--out", type=Path, help="where the figures and report.md go (default: the first directory)")
    ap.add_argument("--no-figure", action="store_true", help="only the tables")
    args = ap.parse_args(argv)
    runs, ps_runs = load_runs(args.dirs)
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    md = "\n\n".join(([table(runs)] if runs else []) + ([ps_table(ps_runs)] if ps_runs else []))
    (out / "report.md").write_text("# Training over a lossy network\n\n" + md + "\n")
    figures = []
    if not args.no_figure and runs:
        figures.append(out / "figure.png")
        figure(runs, figures[-1])
    if not args.no_figure and ps_runs:
        figures.append(out / "figure_ps.png")
        learners = "/".join(str(p) for p in sorted({r["learners"] for r in ps_runs}))
        ps_figure([(_ps_label(r), r["rows"]) for r in ps_runs], figures[-1], f"parameter server, {learners} learners")
    print(md)
    print(f"\nwrote {out / 'report.md'}" + "".join(f" and {f}" for f in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
