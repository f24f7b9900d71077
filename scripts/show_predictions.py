"""Run a trained pipeline on a few fixed example texts and print what it finds.

    python scripts/show_predictions.py training/demo/model-best

The examples are written for this script: none of the sentences, and few of the
names, occur in the demo training data. Pass --text (repeatable) to try your own.
Prints the dev scores stored in the model's meta.json when present.
"""
import argparse
import sys
import time
from pathlib import Path

import spacy

EXAMPLES = [
    "Marguerite Oduya, the chief executive of Bellwether Analytics, flew to Singapore on Thursday to meet regulators.",
    "Shares of Tidewater Robotics fell sharply in Frankfurt after Samuel Achterberg warned that orders were slowing.",
    "The mayor of Valparaiso, Ignacio Ferreyra, said the port would reopen next month.",
    "Cresthaven Mutual and Northwind Freight announced a joint venture in Rotterdam, according to Lena Marsh.",
    "Officials in Kampala confirmed that Joseph Kamau had resigned from Savanna Power after six years.",
]


def format_scores(perf: dict) -> str:
    lines = []
    for key in ("ents_f", "ents_p", "ents_r", "cats_score", "cats_macro_f"):
        if perf.get(key) is not None:
            lines.append(f"  {key:<10} {100 * perf[key]:.2f}")
    per_type = perf.get("ents_per_type") or {}
    for label, s in sorted(per_type.items()):
        lines.append(f"  {label:<10} P {100 * s['p']:.2f}  R {100 * s['r']:.2f}  F {100 * s['f']:.2f}")
    if perf.get("speed") is not None:
        lines.append(f"  speed      {perf['speed']:.0f} words/s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="trained pipeline folder, e.g. training/demo/model-best")
    p.add_argument("--text", action="append", default=None, help="text to analyse instead of the examples")
    p.add_argument("--gpu-id", type=int, default=-1)
    args = p.parse_args()

    if not args.model.exists():
        sys.exit(f"Model not found: {args.model} (run `python -m spacy project run demo-train` first)")
    if args.gpu_id >= 0:
        spacy.require_gpu(args.gpu_id)
    t0 = time.time()
    nlp = spacy.load(args.model)
    print(f"Loaded {args.model} ({', '.join(nlp.pipe_names)}) in {time.time() - t0:.1f} s\n")

    texts = args.text or EXAMPLES
    for i, doc in enumerate(nlp.pipe(texts), 1):
        print(f"[{i}] {doc.text}")
        if doc.ents:
            for ent in doc.ents:
                print(f"      {ent.label_:<7} {ent.text}")
        elif "ner" in nlp.pipe_names:
            print("      (no entities)")
        if doc.cats:
            best = max(doc.cats, key=doc.cats.get)
            print(f"      cats: {best} ({doc.cats[best]:.2f})")
        print()

    perf = nlp.meta.get("performance") or {}
    if perf:
        print("Dev scores from the model's meta.json:")
        print(format_scores(perf))
    else:
        print("No dev scores in the model's meta.json.")


if __name__ == "__main__":
    main()
