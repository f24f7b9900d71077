#!/usr/bin/env python
"""Two domains, one backbone: a news NER adapter (CoNLL-2003) and a medical
NER adapter (BC5CDR) in one process share one backbone and each scores as it
did alone.

Each adapter is first scored alone, in a fresh process of its own (dev F1,
RSS). Then both are loaded into one process: the backbone object must be the
same, and each is scored again (1) on its own dev set through its own
``nlp.pipe``, as alone, and (2) with the two dev sets interleaved in mixed
batches (``pipe_mixed``: rows of both adapters in one backbone pass).

    python bench/two_domains.py --news training/ner/model-best --medical training/medical/model-best

(the `train-ner` and `train-medical` project commands make both). Dev
sentences are scored one a doc, so F1 differs from `spacy evaluate` on the
project's corpora (10 sentences a doc, more context).
"""
import argparse
import sys
import time
from pathlib import Path

from lib import common

DEV = {"news": "conll2003/dev.iob", "medical": "bc5cdr/dev.iob"}


def score_alone(path: str, dev_file: str, limit: int) -> dict:
    """In a fresh process: load one pipeline, score it on its dev set."""
    import spacy

    from spacy_ptuning import get_adapter

    nlp = spacy.load(path)
    refs = common.read_conll(Path(dev_file), nlp.vocab, limit=limit)
    egs, secs = common.predict(nlp, refs)
    backbone = get_adapter(nlp.get_pipe(nlp.pipe_names[0]).model).backbone
    scores = common.score("ner", egs)
    return {"f1": scores["score"], "per_type": scores["per_type"],
            "seconds": secs, "rss_mb": common.rss_mb(), "dtype": backbone.dtype}


def together(paths: dict, dev_files: dict, limit: int) -> dict:
    """In one process: both pipelines, one backbone; each scored alone and in mixed batches."""
    import spacy
    from spacy.tokens import Doc
    from spacy.training import Example

    from spacy_ptuning import get_adapter
    from spacy_ptuning.serving.mixed_batch import pipe_mixed

    nlps = {k: spacy.load(p) for k, p in paths.items()}
    backbones = {k: get_adapter(n.get_pipe(n.pipe_names[0]).model).backbone for k, n in nlps.items()}
    refs = {k: common.read_conll(Path(dev_files[k]), nlps[k].vocab, limit=limit) for k in nlps}
    out = {"same_backbone": len({id(b) for b in backbones.values()}) == 1}
    for k, nlp in nlps.items():
        egs, _ = common.predict(nlp, refs[k])
        out[f"{k}_f1"] = common.score("ner", egs)["score"]
    # Mixed: the two dev sets interleaved, 64 requests a batch.
    requests = []
    for i in range(max(len(r) for r in refs.values())):
        for k in nlps:
            if i < len(refs[k]):
                requests.append((k, refs[k][i]))
    predicted = {k: [] for k in nlps}
    start = time.perf_counter()
    for b in range(0, len(requests), 64):
        chunk = requests[b : b + 64]
        docs = pipe_mixed([(nlps[k], Doc(nlps[k].vocab, words=common.words(ref))) for k, ref in chunk])
        for (k, ref), doc in zip(chunk, docs):
            predicted[k].append(Example(doc, ref))
    out["mixed_seconds"] = time.perf_counter() - start
    for k in nlps:
        out[f"{k}_mixed_f1"] = common.score("ner", predicted[k])["score"]
    out["rss_mb"] = common.rss_mb()  # after use, as in score_alone
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--news", required=True, help="saved CoNLL-2003 NER pipeline")
    p.add_argument("--medical", required=True, help="saved BC5CDR NER pipeline")
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--dev-sents", type=int, default=0, help="first N dev sentences of each (0 = all)")
    args = p.parse_args()
    paths = {"news": args.news, "medical": args.medical}
    dev_files = {k: str(args.data_dir / f) for k, f in DEV.items()}
    for k, f in dev_files.items():
        if not Path(f).is_file():
            sys.exit(f"error: {f} not found (the {k} dev set). Pass --data-dir DIR.")
    alone = {}
    for k in paths:
        with common.Isolated(2) as child:
            alone[k] = child.call(score_alone, paths[k], dev_files[k], args.dev_sents)
    with common.Isolated(2) as child:
        both = child.call(together, paths, dev_files, args.dev_sents)
    print(f"\nDev sets: {'all' if not args.dev_sents else f'first {args.dev_sents} sentences'}; "
          f"backbone dtype {alone['news']['dtype']} / {alone['medical']['dtype']}; "
          f"one backbone object in the joint process: {both['same_backbone']}\n")
    print("| adapter | dev F1 alone | together, own nlp.pipe | together, mixed batches | RSS alone MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in paths:
        print(f"| {k} ({DEV[k].split('/')[0]}) | {100 * alone[k]['f1']:.2f} | {100 * both[f'{k}_f1']:.2f} | "
              f"{100 * both[f'{k}_mixed_f1']:.2f} | {alone[k]['rss_mb']:.0f} |")
    print(f"\nRSS after both were loaded and used: {both['rss_mb']:.0f} MiB "
          f"(alone: {alone['news']['rss_mb']:.0f} and {alone['medical']['rss_mb']:.0f})")
    print("Per type, alone: " + "; ".join(
        f"{k}: " + ", ".join(f"{t} {100 * v['f']:.1f}" for t, v in sorted(alone[k]["per_type"].items()))
        for k in paths))
    same = all(round(100 * alone[k]["f1"], 1) == round(100 * both[f"{k}_f1"], 1) for k in paths)
    print(f"Same dev F1 to the decimal, alone and together: {'YES' if same else 'NO'}")
    return 0 if same and both["same_backbone"] else 1


if __name__ == "__main__":
    sys.exit(main())
