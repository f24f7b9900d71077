#!/usr/bin/env python
"""Collect bench/compare.py runs into one markdown report with PNG plots.

    python bench/report.py bench/results/project/ner.json bench/results/project/textcat.json \
        --out bench/results/project/report.md

Inputs: compare.py JSON files (folders are searched for *.json written by
compare.py; missing files are skipped with a note, so a report can be made
before every benchmark has run). Output: the markdown file, and beside it per
task ``<stem>_<task>_curve.png`` (dev score against pure training time, all
runs of the task in one plot: e.g. the equal-budget run and a longer one) and
``<stem>_<task>_ratios.png`` (each system's cost relative to (a),
spacy-transformers full fine-tuning).
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import TASKS, label, plot, render, summarise, title_of  # noqa: E402

RATIOS = (  # (summary key, axis label, better when)
    ("step_s", "step time, fixed batch", "lower"),
    ("train_wps", "train words/s", "higher"),
    ("peak_rss_mb", "peak train RSS", "lower"),
    ("infer_wps", "inference words/s", "higher"),
)


def load_runs(paths: List[Path]) -> Tuple[List[dict], List[str]]:
    runs, notes = [], []
    for p in paths:
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        if not files:
            notes.append(f"no results in {p}")
        for f in files:
            if not f.is_file():
                notes.append(f"not found: {f} (run its benchmark first)")
                continue
            try:
                run = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                notes.append(f"skipped {f}: not JSON ({e})")
                continue
            if not {"systems", "checkpoints", "args"} <= run.keys():
                notes.append(f"skipped {f}: not a bench/compare.py result")
                continue
            run["_file"] = str(f)
            runs.append(run)
    return runs, notes


def _dev_sents(run: dict) -> int:
    return next((r["ready"]["dev_sents"] for r in run["systems"].values() if "ready" in r), 0)


def plot_ratios(runs: List[dict], path: Path, task: str) -> Optional[str]:
    """Grouped bars: each system's measure divided by (a)'s, from the run
    with the shortest budget (the equal-budget comparison)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available: {e}"
    run = min(runs, key=lambda r: r["args"]["budget_seconds"])
    summ = summarise(run["systems"])
    a = summ.get("st", {})
    systems = [s for s, v in summ.items() if s != "st" and "trainable" in v]
    if "trainable" not in a or not systems:
        return "no (a) or no other system in the run"
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        vals = [summ[s][k] / a[k] if summ[s].get(k) and a.get(k) else 0 for k, _, _ in RATIOS]
        ax.bar([j + i * width for j in range(len(RATIOS))], vals, width, label=label(s, task),
               color=f"C{list(summ).index(s)}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(RATIOS))])
    ax.set_xticklabels([f"{name}\n({better} is better)" for _, name, better in RATIOS], fontsize=8)
    ax.set_ylabel("relative to (a) spacy-transformers full fine-tuning")
    ax.set_title(title_of(run), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help="compare.py JSON files or folders holding them")
    ap.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = ap.parse_args()

    runs, notes = load_runs(args.inputs)
    if not runs:
        sys.exit("error: no bench/compare.py results found in " + ", ".join(map(str, args.inputs))
                 + "\nRun the benchmark first: python -m spacy project run benchmark")
    by_task: Dict[str, List[dict]] = {}
    for run in runs:
        by_task.setdefault(run["args"].get("task", "ner"), []).append(run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# spacy-ptuning benchmark report ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    lines += [f"- note: {n}" for n in notes] + ([""] if notes else [])
    for task, task_runs in by_task.items():
        task_runs.sort(key=lambda r: r["args"]["budget_seconds"])
        stem = f"{args.out.stem}_{task}"
        lines += [f"## {TASKS[task][4]}", ""]
        title = title_of(task_runs[0])
        if len(task_runs) > 1:
            title = title.split(",")[0] + ": " + "; ".join(
                f"{r['args']['budget_seconds']:g}s budget, dev {_dev_sents(r)} sentences" for r in task_runs)
        for png, err in ((f"{stem}_curve.png", plot(task_runs, args.out.parent / f"{stem}_curve.png", title)),
                         (f"{stem}_ratios.png", plot_ratios(task_runs, args.out.parent / f"{stem}_ratios.png", task))):
            lines += [f"![{png}]({png})" if not err else f"(no {png}: {err})", ""]
        for run in task_runs:
            lines += [f"### budget {run['args']['budget_seconds']:g} s per system ({Path(run['_file']).name})", "",
                      render(run), ""]
    args.out.write_text("\n".join(lines))
    print(f"Wrote {args.out} ({len(runs)} runs: " + ", ".join(f"{t} x{len(r)}" for t, r in by_task.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
