#!/usr/bin/env python
"""Real-data check: ptuning_ner on CoNLL-2003 English.

Trains the ``ptuning_ner`` component (frozen MiniLM backbone, trainable
continuous prompts + spaCy's transition-based NER head) on the first N
training sentences with the settings of configs/ner.cfg, and reports dev
entity P/R/F1 (spaCy's scorer), training words/s (words in the training
batches / wall time spent inside nlp.update, evaluation excluded) and the
trainable-parameter share, next to two reference points: a model that
predicts nothing (F1 = 0) and a lookup of entity strings seen in the training
subset.

The data is read in place (default: ../shared/data relative to the repo root)
and never copied. Results go to bench/results/ (git-ignored) as JSON, and a
markdown table is printed at the end.

    python bench/conll_ner.py --train-sents 200 --dev-sents 300 --max-steps 30   # smoke
    python bench/conll_ner.py --train-sents 2000 --max-steps 1500 --max-seconds 600 --lr 5e-3
"""
import argparse
import json
import os
import re
import resource
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_CONFIG = REPO / "configs" / "ner.cfg"
RESULTS = REPO / "bench" / "results"
METHODS = ("prefix", "prompt_encoder", "prompt")

Sentence = Tuple[List[str], List[str]]


# --------------------------------------------------------------------------- data
def read_iob(path: Path, limit: int = 0) -> List[Sentence]:
    """`TOKEN POS CHUNK NER` per line, blank line between sentences. Tags are
    repaired to valid IOB2 (an I- that does not continue a same-type entity
    becomes B-); the number of repairs is reported."""
    sents: List[Sentence] = []
    words: List[str] = []
    tags: List[str] = []
    with path.open(encoding="utf8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                if words:
                    sents.append((words, tags))
                    words, tags = [], []
                    if limit and len(sents) >= limit:
                        return sents
                continue
            if line.startswith("-DOCSTART-"):
                continue
            parts = line.split()
            if len(parts) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'TOKEN POS CHUNK NER', got {line!r}")
            tag = parts[-1]
            if tag != "O" and not re.match(r"^[BI]-\S+$", tag):
                raise ValueError(f"{path}:{lineno}: bad NER tag {tag!r}")
            words.append(parts[0])
            tags.append(tag)
    if words:
        sents.append((words, tags))
    return sents[:limit] if limit else sents


def repair_iob2(tags: Sequence[str]) -> Tuple[List[str], int]:
    out, fixes, prev = [], 0, "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
            fixes += 1
        out.append(tag)
        prev = tag
    return out, fixes


def to_examples(nlp, sents: List[Sentence], sents_per_doc: int):
    from spacy.tokens import Doc
    from spacy.training import Example

    examples, fixes = [], 0
    for i in range(0, len(sents), sents_per_doc):
        group = sents[i : i + sents_per_doc]
        words = [w for ws, _ in group for w in ws]
        tags = []
        for _, ts in group:
            fixed, n = repair_iob2(ts)
            tags.extend(fixed)
            fixes += n
        reference = Doc(nlp.vocab, words=words, ents=tags)
        if sents_per_doc > 1:  # keep the sentence boundaries on the reference
            starts = set()
            k = 0
            for ws, _ in group:
                starts.add(k)
                k += len(ws)
            for tok in reference:
                tok.is_sent_start = tok.i in starts
        examples.append(Example(Doc(nlp.vocab, words=words), reference))
    return examples, fixes


def load_split(data_dir: Path, name: str, limit: int) -> List[Sentence]:
    path = data_dir / "conll2003" / f"{name}.iob"
    if not path.is_file():
        sys.exit(
            f"error: CoNLL-2003 file not found: {path}\n"
            f"Expected {data_dir}/conll2003/train.iob and dev.iob (one 'TOKEN POS CHUNK NER' "
            f"per line, blank line between sentences). Pass --data-dir DIR."
        )
    sents = read_iob(path, limit)
    if not sents:
        sys.exit(f"error: no sentences in {path}")
    return sents


# ------------------------------------------------------------------ references
def empty_prediction_scores(dev_examples) -> Dict[str, float]:
    """'A model that predicts nothing', scored by spaCy's NER scorer."""
    from spacy.scorer import get_ner_prf
    from spacy.training import Example

    egs = [Example(eg.predicted.copy(), eg.reference) for eg in dev_examples]
    s = get_ner_prf(egs)
    return {"ents_p": s["ents_p"], "ents_r": s["ents_r"], "ents_f": s["ents_f"]}


def lookup_scores(train_sents: List[Sentence], dev_examples) -> Dict[str, float]:
    """Tag dev token sequences that were entities in the training subset with
    their most frequent type (greedy, longest match first)."""
    from spacy.scorer import get_ner_prf
    from spacy.tokens import Span
    from spacy.training import Example

    counts: Dict[Tuple[str, ...], Counter] = defaultdict(Counter)
    for words, tags in train_sents:
        tags, _ = repair_iob2(tags)
        i = 0
        while i < len(words):
            if tags[i].startswith("B-"):
                j = i + 1
                while j < len(words) and tags[j] == "I-" + tags[i][2:]:
                    j += 1
                counts[tuple(words[i:j])][tags[i][2:]] += 1
                i = j
            else:
                i += 1
    lexicon = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    max_len = max((len(k) for k in lexicon), default=0)
    egs = []
    for eg in dev_examples:
        doc = eg.predicted.copy()
        words = [t.text for t in doc]
        spans, i = [], 0
        while i < len(words):
            for n in range(min(max_len, len(words) - i), 0, -1):
                label = lexicon.get(tuple(words[i : i + n]))
                if label:
                    spans.append(Span(doc, i, i + n, label=label))
                    i += n
                    break
            else:
                i += 1
        doc.ents = spans
        egs.append(Example(doc, eg.reference))
    s = get_ner_prf(egs)
    return {"ents_p": s["ents_p"], "ents_r": s["ents_r"], "ents_f": s["ents_f"]}


# ------------------------------------------------------------------ training
def load_pipeline(config_path: Path, overrides: dict, seed: int):
    """A blank pipeline from a training config with ``overrides``; returns the
    nlp, the interpolated config and the resolved [training] block."""
    import spacy  # noqa: F401  (registers everything)
    import spacy_ptuning  # noqa: F401  (registers the factories/architectures)
    from spacy import util
    from spacy.schemas import ConfigSchemaTraining
    from spacy.util import registry

    config = util.load_config(config_path, overrides=overrides, interpolate=False)
    util.fix_random_seed(seed)
    nlp = util.load_model_from_config(config, auto_fill=True, validate=True)
    config = nlp.config.interpolate()
    return nlp, config, registry.resolve(config["training"], schema=ConfigSchemaTraining)


def build(args):
    overrides = {
        "components.ner.model.tok2vec.method": args.method,
        "components.ner.model.tok2vec.num_virtual_tokens": args.num_virtual_tokens,
        "training.max_steps": args.max_steps,
        "training.seed": args.seed,
        "system.seed": args.seed,
    }
    if args.backbone:
        overrides["components.ner.model.tok2vec.backbone"] = args.backbone
    if args.lr is not None:
        overrides["training.optimizer.learn_rate.initial_rate"] = args.lr
    if args.warmup_steps is not None:
        overrides["training.optimizer.learn_rate.warmup_steps"] = args.warmup_steps
    if args.dropout is not None:
        overrides["training.dropout"] = args.dropout
    return load_pipeline(args.config, overrides, args.seed)


def evaluate(nlp, dev_examples, batch_size: int) -> Tuple[dict, float]:
    t0 = time.perf_counter()
    scores = nlp.evaluate(dev_examples, batch_size=batch_size)
    return scores, time.perf_counter() - t0


def pick(scores: dict) -> dict:
    keep = {k: scores.get(k) for k in ("ents_p", "ents_r", "ents_f")}
    keep["ents_per_type"] = scores.get("ents_per_type")
    return keep


def train(args, nlp, T, train_examples, dev_examples, log) -> dict:
    from spacy import util
    from spacy.training.loop import create_train_batches

    from spacy_ptuning import trainable_summary

    optimizer = T["optimizer"]
    util.fix_random_seed(args.seed)
    t0 = time.perf_counter()
    nlp.initialize(lambda: train_examples, sgd=optimizer)
    init_s = time.perf_counter() - t0
    ner = nlp.get_pipe("ner")
    summary = trainable_summary("ner", ner.model)
    log(f"init {init_s:.1f}s; {summary}")

    batches = create_train_batches(
        nlp, lambda _nlp: train_examples, T["batcher"], T["max_epochs"]
    )
    dropout = T["dropout"]
    eval_every = args.eval_every or T["eval_frequency"]
    history, best = [], None
    step = words = sents = 0
    epoch = 0
    train_s = eval_s = 0.0
    cpu0 = time.process_time()
    cpu_eval = 0.0
    losses: Dict[str, float] = {}
    load_start = os.getloadavg()
    stop_reason = "max_steps"

    def do_eval():
        nonlocal eval_s, best, cpu_eval
        c0 = time.process_time()
        scores, secs = evaluate(nlp, dev_examples, args.eval_batch_size)
        cpu_eval += time.process_time() - c0
        eval_s += secs
        row = {
            "step": step,
            "epoch": epoch,
            "train_seconds": round(train_s, 1),
            "words": words,
            "loss_ner": round(losses.get("ner", 0.0), 2),
            "ents_p": scores["ents_p"],
            "ents_r": scores["ents_r"],
            "ents_f": scores["ents_f"],
            "eval_seconds": round(secs, 1),
            "eval_words_per_s": round(scores.get("speed", 0.0)),
            "lr": _lr(optimizer),
        }
        history.append(row)
        if best is None or scores["ents_f"] > best[1]["ents_f"]:
            best = (step, pick(scores))
        log(
            f"step {step:5d} ep {epoch} | train {train_s:6.1f}s {words / max(train_s, 1e-9):6.0f} w/s | "
            f"loss {losses.get('ner', 0.0):8.2f} | dev P {100 * scores['ents_p']:.1f} "
            f"R {100 * scores['ents_r']:.1f} F {100 * scores['ents_f']:.1f} ({secs:.0f}s)"
        )
        losses.clear()
        return scores

    if args.eval_at_start:
        do_eval()
    last_scores = None
    while True:
        epoch, batch = next(batches)
        t = time.perf_counter()
        nlp.update(batch, drop=dropout, sgd=optimizer, losses=losses)
        optimizer.step_schedules()
        train_s += time.perf_counter() - t
        step += 1
        words += sum(len(eg.predicted) for eg in batch)
        sents += len(batch)
        last_scores = None
        if step % 20 == 0 and args.verbose:
            log(f"  step {step} {train_s:.1f}s {words / train_s:.0f} w/s loss {losses.get('ner', 0):.1f}")
        if step % eval_every == 0:
            last_scores = do_eval()
        if step >= T["max_steps"] > 0:
            break
        if args.max_seconds and train_s >= args.max_seconds:
            stop_reason = "max_seconds"
            break
    cpu_total = time.process_time() - cpu0
    if last_scores is None:
        last_scores = do_eval()
    load_end = os.getloadavg()
    return {
        "summary": summary,
        "init_seconds": round(init_s, 1),
        "steps": step,
        "epochs_started": epoch + 1,
        "stop_reason": stop_reason,
        "train_seconds": round(train_s, 1),
        "train_words": words,
        "train_docs_seen": sents,
        "words_per_s": round(words / train_s, 1),
        "eval_seconds_total": round(eval_s, 1),
        "cpu_util_train": round((cpu_total - cpu_eval) / max(train_s, 1e-9), 2),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "final": pick(last_scores),
        "best_step": best[0],
        "best": best[1],
        "history": history,
    }


def _lr(optimizer) -> Optional[float]:
    try:
        return float(optimizer.learn_rate)
    except Exception:
        return None


# ------------------------------------------------------------------ report
def fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(res: dict) -> str:
    t = res["train"]
    share = re.search(r"\(([\d.]+) %\)", t["summary"])
    share = f"{share.group(1)} %" if share else "?"
    rows = [
        ("predicts nothing", res["baselines"]["predicts_nothing"], "-", "-", "-"),
        ("lookup of train-subset entity strings", res["baselines"]["train_lookup"], "-", "-", "-"),
        (
            f"ptuning_ner {res['args']['method']}, lr {res['lr']:g}, final (step {t['steps']})",
            t["final"], f"{t['words_per_s']:.0f}", share, f"{t['train_seconds']:.0f}",
        ),
        (
            f"ptuning_ner {res['args']['method']}, lr {res['lr']:g}, best dev (step {t['best_step']})",
            t["best"], f"{t['words_per_s']:.0f}", share, f"{t['train_seconds']:.0f}",
        ),
    ]
    out = [
        "| model | dev P | dev R | dev F1 | train words/s | trainable | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s, wps, sh, secs in rows:
        out.append(
            f"| {name} | {fmt(s['ents_p'])} | {fmt(s['ents_r'])} | {fmt(s['ents_f'])} | {wps} | {sh} | {secs} |"
        )
    per_type = t["final"].get("ents_per_type") or {}
    if per_type:
        out.append("")
        out.append("| type (final) | P | R | F1 |")
        out.append("| --- | ---: | ---: | ---: |")
        for label in sorted(per_type):
            s = per_type[label]
            out.append(f"| {label} | {s['p'] * 100:.1f} | {s['r'] * 100:.1f} | {s['f'] * 100:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder holding conll2003/ (default %(default)s)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--train-sents", type=int, default=2000, help="first N training sentences (0 = all)")
    p.add_argument("--dev-sents", type=int, default=0, help="first N dev sentences (0 = all; the check uses all)")
    p.add_argument("--sents-per-doc", type=int, default=1, help="sentences grouped into one Doc (default 1)")
    p.add_argument("--method", choices=METHODS, default="prefix")
    p.add_argument("--num-virtual-tokens", type=int, default=16)
    p.add_argument("--backbone", default=None, help="override the config's backbone")
    p.add_argument("--lr", type=float, default=None, help="initial_rate of the warmup_linear schedule (config: 5e-3)")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--dropout", type=float, default=None, help="spaCy dropout (head only; config 0.1)")
    p.add_argument("--max-steps", type=int, default=2000, help="also the schedule's total_steps")
    p.add_argument("--max-seconds", type=float, default=0, help="stop after this much pure training time (0 = no limit)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0 = config's eval_frequency)")
    p.add_argument("--eval-at-start", action="store_true", help="also score the untrained model")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--tag", default="", help="suffix for the results file name")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.sents_per_doc < 1:
        p.error("--sents-per-doc must be >= 1")

    t_start = time.perf_counter()

    def log(s: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {s}", flush=True)

    data_dir = args.data_dir.resolve()
    train_sents = load_split(data_dir, "train", args.train_sents)
    dev_sents = load_split(data_dir, "dev", args.dev_sents)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    nlp, config, T = build(args)
    train_examples, fix_tr = to_examples(nlp, train_sents, args.sents_per_doc)
    dev_examples, fix_dev = to_examples(nlp, dev_sents, args.sents_per_doc)
    n_ents = lambda egs: sum(len(eg.reference.ents) for eg in egs)  # noqa: E731
    log(
        f"train: {len(train_sents)} sents, {sum(len(w) for w, _ in train_sents)} words, "
        f"{n_ents(train_examples)} ents, {len(train_examples)} docs | dev: {len(dev_sents)} sents, "
        f"{sum(len(w) for w, _ in dev_sents)} words, {n_ents(dev_examples)} ents | IOB repairs {fix_tr}/{fix_dev} "
        f"| torch threads {torch.get_num_threads()} | loadavg {os.getloadavg()}"
    )
    baselines = {
        "predicts_nothing": empty_prediction_scores(dev_examples),
        "train_lookup": lookup_scores(train_sents, dev_examples),
    }
    lr = config["training"]["optimizer"]["learn_rate"]["initial_rate"]
    log(
        f"method={args.method} P={args.num_virtual_tokens} lr={lr} max_steps={T['max_steps']} "
        f"max_seconds={args.max_seconds} dropout={T['dropout']} batcher size schedule from {args.config.name}"
    )
    result = train(args, nlp, T, train_examples, dev_examples, log)
    res = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lr": lr,
        "data": {
            "train_sents": len(train_sents),
            "train_words": sum(len(w) for w, _ in train_sents),
            "train_docs": len(train_examples),
            "dev_sents": len(dev_sents),
            "dev_words": sum(len(w) for w, _ in dev_sents),
            "dev_ents": n_ents(dev_examples),
        },
        "baselines": baselines,
        "train": result,
        "env": {
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        },
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"conll_ner_{args.method}_n{len(train_sents)}_lr{lr:g}_{time.strftime('%Y%m%d-%H%M%S')}"
    if args.tag:
        name += f"_{args.tag}"
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(res, indent=2, default=float))
    print()
    print(result["summary"])
    print(
        f"steps {result['steps']} ({result['stop_reason']}), {result['train_docs_seen']} docs / "
        f"{result['train_words']} words seen, train {result['train_seconds']}s, eval {result['eval_seconds_total']}s, "
        f"total wall {res['wall_seconds']}s, train CPU use {result['cpu_util_train']} cores, "
        f"loadavg {result['loadavg_start'][0]:.2f} -> {result['loadavg_end'][0]:.2f}"
    )
    print()
    print(table(res))
    print(f"\nwritten {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
