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

The data is read in place with spaCy's CoNLL converter (default:
../shared/data relative to the repo root) and never copied. Results go to
bench/results/ (git-ignored) as JSON, and a markdown table is printed at the
end.

    python bench/conll_ner.py --train-sents 200 --dev-sents 300 --max-steps 30   # smoke
    python bench/conll_ner.py --train-sents 2000 --max-steps 1500 --max-seconds 600 --lr 5e-3
"""
import argparse
import os
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Optional

from lib import common

METHODS = ("prefix", "prompt_encoder", "prompt")


# ------------------------------------------------------------------ references
def lookup_scores(train_docs, dev_docs) -> Dict[str, float]:
    """Tag dev token sequences that were entities in the training subset with
    their most frequent type (greedy, longest match first)."""
    from spacy.tokens import Doc, Span
    from spacy.training import Example

    counts: Dict[tuple, Counter] = defaultdict(Counter)
    for doc in train_docs:
        for ent in doc.ents:
            counts[tuple(t.text for t in ent)][ent.label_] += 1
    lexicon = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    max_len = max((len(k) for k in lexicon), default=0)
    egs = []
    for ref in dev_docs:
        words, spans, i = common.words(ref), [], 0
        doc = Doc(ref.vocab, words=words)
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
        egs.append(Example(doc, ref))
    return common.score("ner", egs)


# ------------------------------------------------------------------ training
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
    return common.load_pipeline(args.config, overrides, args.seed)


def train(args, nlp, T, train_examples, dev_docs, log) -> dict:
    """The config's batcher and step-based schedule, common.Trainer's timing:
    evaluate every --eval-every steps, stop at max_steps or --max-seconds."""
    from spacy import util
    from spacy.training.loop import create_train_batches

    from spacy_ptuning import trainable_summary

    optimizer = T["optimizer"]
    util.fix_random_seed(args.seed)
    t0 = time.perf_counter()
    nlp.initialize(lambda: train_examples, sgd=optimizer)
    init_s = time.perf_counter() - t0
    summary = trainable_summary("ner", nlp.get_pipe("ner").model)
    log(f"init {init_s:.1f}s; {summary}")

    losses: Dict[str, float] = {}
    update = common.nlp_update(nlp, optimizer, T["dropout"], losses, step_schedules=True)
    trainer = common.Trainer(update, create_train_batches(nlp, lambda _nlp: train_examples, T["batcher"],
                                                          T["max_epochs"]))
    eval_every = args.eval_every or T["eval_frequency"]
    max_steps = T["max_steps"] or float("inf")
    max_seconds = args.max_seconds or float("inf")
    history, best, step_log = [], None, []
    eval_s = cpu_eval = 0.0
    cpu0 = time.process_time()
    load_start = os.getloadavg()
    stop_reason = "max_steps"

    def do_eval():
        nonlocal eval_s, best, cpu_eval
        c0 = time.process_time()
        egs, secs = common.predict(nlp, dev_docs, args.eval_batch_size)
        scores = common.score("ner", egs)
        cpu_eval += time.process_time() - c0
        eval_s += secs
        row = {
            "step": trainer.steps, "epoch": trainer.epoch, "train_seconds": round(trainer.seconds, 1),
            "words": trainer.words, "loss_ner": round(losses.get("ner", 0.0), 2),
            "ents_p": scores["p"], "ents_r": scores["r"], "ents_f": scores["f1"],
            "eval_seconds": round(secs, 1), "eval_words_per_s": round(sum(len(d) for d in dev_docs) / secs),
            "lr": _lr(optimizer),
        }
        history.append(row)
        if best is None or scores["f1"] > best[1]["f1"]:
            best = (trainer.steps, scores)
        log(
            f"step {trainer.steps:5d} ep {trainer.epoch} | train {trainer.seconds:6.1f}s "
            f"{trainer.words / max(trainer.seconds, 1e-9):6.0f} w/s | loss {losses.get('ner', 0.0):8.2f} | "
            f"dev P {100 * scores['p']:.1f} R {100 * scores['r']:.1f} F {100 * scores['f1']:.1f} ({secs:.0f}s)"
        )
        losses.clear()
        return scores

    if args.eval_at_start:
        do_eval()
    last_scores = None
    while True:
        next_eval = (trainer.steps // eval_every + 1) * eval_every
        step_log += trainer.run(until_steps=min(next_eval, max_steps), until_seconds=max_seconds)
        last_scores = do_eval() if trainer.steps % eval_every == 0 else None
        if trainer.steps >= max_steps:
            break
        if trainer.seconds >= max_seconds:
            stop_reason = "max_seconds"
            break
    cpu_total = time.process_time() - cpu0
    if last_scores is None:
        last_scores = do_eval()
    return {
        "summary": summary,
        "init_seconds": round(init_s, 1),
        "steps": trainer.steps,
        "epochs_started": trainer.epoch + 1,
        "stop_reason": stop_reason,
        "train_seconds": round(trainer.seconds, 1),
        "train_words": trainer.words,
        "words_per_s": round(trainer.words / trainer.seconds, 1),
        "eval_seconds_total": round(eval_s, 1),
        "cpu_util_train": round((cpu_total - cpu_eval) / max(trainer.seconds, 1e-9), 2),
        "peak_train_rss_mb": max(x[2] for x in step_log),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "final": last_scores,
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
    run = f"ptuning_ner {res['args']['method']}, lr {res['lr']:g}"
    rows = [
        ("predicts nothing", res["baselines"]["predicts_nothing"], "-", "-", "-"),
        ("lookup of train-subset entity strings", res["baselines"]["train_lookup"], "-", "-", "-"),
        (f"{run}, final (step {t['steps']})", t["final"], f"{t['words_per_s']:.0f}", share, f"{t['train_seconds']:.0f}"),
        (f"{run}, best dev (step {t['best_step']})", t["best"], f"{t['words_per_s']:.0f}", share,
         f"{t['train_seconds']:.0f}"),
    ]
    out = [
        "| model | dev P | dev R | dev F1 | train words/s | trainable | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s, wps, sh, secs in rows:
        out.append(f"| {name} | {fmt(s['p'])} | {fmt(s['r'])} | {fmt(s['f1'])} | {wps} | {sh} | {secs} |")
    per_type = t["final"].get("per_type") or {}
    if per_type:
        out += ["", "| type (final) | P | R | F1 |", "| --- | ---: | ---: | ---: |"]
        for label in sorted(per_type):
            s = per_type[label]
            out.append(f"| {label} | {s['p'] * 100:.1f} | {s['r'] * 100:.1f} | {s['f'] * 100:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA, help="folder holding conll2003/ (default %(default)s)")
    p.add_argument("--config", type=Path, default=common.TASKS["ner"].config)
    p.add_argument("--train-sents", type=int, default=2000, help="first N training sentences (0 = all)")
    p.add_argument("--dev-sents", type=int, default=0, help="first N dev sentences (0 = all; the check uses all)")
    p.add_argument("--sents-per-doc", type=int, default=1, help="sentences grouped into one Doc (default 1)")
    p.add_argument("--method", choices=METHODS, default="prefix")
    p.add_argument("--num-virtual-tokens", type=int, default=16)
    p.add_argument("--backbone", default=None, help="override the config's backbone")
    p.add_argument("--lr", type=float, default=None, help="initial_rate of the warmup_linear schedule (config: 1e-2)")
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
    args = p.parse_args(argv)
    if args.sents_per_doc < 1:
        p.error("--sents-per-doc must be >= 1")

    t_start, log = time.perf_counter(), common.logger()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    nlp, config, T = build(args)
    conll = args.data_dir.resolve() / "conll2003"
    train_docs = common.read_conll(conll / "train.iob", nlp.vocab, args.train_sents, args.sents_per_doc)
    dev_docs = common.read_conll(conll / "dev.iob", nlp.vocab, args.dev_sents, args.sents_per_doc)
    train_examples = common.examples(nlp, train_docs)
    data = {
        "train_sents": sum(1 for d in train_docs for _ in d.sents),
        "train_words": sum(len(d) for d in train_docs),
        "train_docs": len(train_docs),
        "dev_sents": sum(1 for d in dev_docs for _ in d.sents),
        "dev_words": sum(len(d) for d in dev_docs),
        "dev_ents": sum(len(d.ents) for d in dev_docs),
    }
    log(
        f"train: {data['train_sents']} sents, {data['train_words']} words, "
        f"{sum(len(d.ents) for d in train_docs)} ents, {len(train_docs)} docs | dev: {data['dev_sents']} sents, "
        f"{data['dev_words']} words, {data['dev_ents']} ents | torch threads {torch.get_num_threads()} "
        f"| loadavg {os.getloadavg()}"
    )
    from spacy.training import Example

    baselines = {
        "predicts_nothing": common.score("ner", [Example(eg.predicted, eg.reference)
                                                 for eg in common.examples(nlp, dev_docs)]),
        "train_lookup": lookup_scores(train_docs, dev_docs),
    }
    lr = config["training"]["optimizer"]["learn_rate"]["initial_rate"]
    log(
        f"method={args.method} P={args.num_virtual_tokens} lr={lr} max_steps={T['max_steps']} "
        f"max_seconds={args.max_seconds} dropout={T['dropout']} batcher size schedule from {args.config.name}"
    )
    result = train(args, nlp, T, train_examples, dev_docs, log)
    res = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lr": lr,
        "data": data,
        "baselines": baselines,
        "train": result,
        "machine": {**common.machine_info(), "torch_threads": torch.get_num_threads()},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    name = common.stamped(f"conll_ner_{args.method}_n{data['train_sents']}_lr{lr:g}", args.tag)
    out = common.save_json(res, common.RESULTS / f"{name}.json")
    print()
    print(result["summary"])
    print(
        f"steps {result['steps']} ({result['stop_reason']}), {result['train_words']} words seen, "
        f"train {result['train_seconds']}s, eval {result['eval_seconds_total']}s, "
        f"total wall {res['wall_seconds']}s, train CPU use {result['cpu_util_train']} cores, "
        f"loadavg {result['loadavg_start'][0]:.2f} -> {result['loadavg_end'][0]:.2f}"
    )
    print()
    print(table(res))
    print(f"\nwritten {out.relative_to(common.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
