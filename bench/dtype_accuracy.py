#!/usr/bin/env python
"""Does a bfloat16 backbone keep the accuracy? (the speed issue's evidence)

For CoNLL-2003 NER (configs/ner.cfg) and SST-2 sentiment (configs/textcat.cfg):
train one adapter with a float32 backbone and one with a bfloat16 backbone,
the same steps over the same batches (Adam at the config's peak rate, linear
decay), then score each on the full dev set under both backbone dtypes (the
same saved adapter loaded with ``dtype`` overridden). Prints one table; JSON
to bench/results/.

    python bench/dtype_accuracy.py [--steps 300] [--tasks ner,textcat] [--seed 0] [--data-dir ../shared/data]
"""
import argparse
import time
from pathlib import Path

from lib import common

CONFIGS = common.REPO / "configs"
TASKS = {"ner": ("ner.cfg", "ner"), "textcat": ("textcat.cfg", "textcat")}


def score(nlp, dev, task: str) -> float:
    egs, _ = common.predict(nlp, dev)
    if task == "ner":
        return 100 * _ents_f(egs)
    right = sum(max(e.predicted.cats, key=e.predicted.cats.get) == max(e.reference.cats, key=e.reference.cats.get)
                for e in egs)
    return 100 * right / len(egs)


def _ents_f(egs) -> float:
    from spacy.scorer import get_ner_prf

    return get_ner_prf(egs)["ents_f"]


def with_dtype(nlp, component: str, dtype: str):
    import spacy

    config = nlp.config.copy()
    config["components"][component]["model"]["tok2vec"]["dtype"] = dtype
    return spacy.blank("en").from_config(config).from_bytes(nlp.to_bytes())


def read_task(task: str, data_dir: Path, vocab):
    """(train, dev) records of a task's data."""
    if task == "ner":
        return (common.read_conll(data_dir / "conll2003" / "train.iob", vocab),
                common.read_conll(data_dir / "conll2003" / "dev.iob", vocab))
    return (common.read_sst2(data_dir / "sst2" / "train.tsv", vocab),
            common.read_sst2(data_dir / "sst2" / "dev.tsv", vocab))


def train(task: str, train_records, steps: int, seed: int, dtype: str):
    """The task's shipped config with a ``dtype`` backbone, trained ``steps``
    steps (Adam at the config's peak rate, linear decay): (nlp, train words/s)."""
    from thinc.api import Adam

    cfg, component = TASKS[task]
    overrides = {f"components.{component}.model.tok2vec.dtype": dtype, "training.max_steps": steps}
    nlp, config, training = common.load_pipeline(CONFIGS / cfg, overrides, seed=seed)
    egs = common.examples(nlp, train_records)
    peak = config["training"]["optimizer"]["learn_rate"]["initial_rate"]
    sgd = Adam(peak)
    nlp.initialize(lambda: egs[:500], sgd=sgd)
    batches = common.epoch_batches(egs, [len(e.predicted) for e in egs], seed=seed)

    def schedule(_, step=[0]):  # noqa: B006 - linear decay by step
        sgd.learn_rate = peak * max(0.0, 1 - step[0] / steps)
        step[0] += 1

    trainer = common.Trainer(common.nlp_update(nlp, sgd), batches, before_step=schedule)
    trainer.run(until_steps=steps)
    return nlp, trainer.words / trainer.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tasks", default="ner,textcat")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    args = p.parse_args()
    import spacy

    vocab = spacy.blank("en").vocab
    rows = []
    for task in args.tasks.split(","):
        _, component = TASKS[task]
        train_records, dev = read_task(task, args.data_dir, vocab)
        trained = {}
        for dtype in ("float32", "bfloat16"):
            nlp, words_per_s = train(task, train_records, args.steps, args.seed, dtype)
            trained[dtype] = nlp
            rows.append({"task": task, "trained": dtype, "steps": args.steps, "train_words_per_s": words_per_s})
            print(f"{task}: trained with {dtype}: {words_per_s:.0f} words/s", flush=True)
        for row in [r for r in rows if r["task"] == task]:
            nlp = trained[row["trained"]]
            for dtype in ("float32", "bfloat16"):
                scored = nlp if dtype == row["trained"] else with_dtype(nlp, component, dtype)
                start = time.perf_counter()
                row[f"dev_{dtype}"] = score(scored, dev, task)
                row[f"infer_s_{dtype}"] = time.perf_counter() - start
            print(row, flush=True)
    metric = {"ner": "dev ents_f", "textcat": "dev accuracy"}
    lines = ["| task | metric | adapter trained with | steps | train words/s | scored with float32 | scored with bfloat16 | difference |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['task']} | {metric[r['task']]} | {r['trained']} | {r['steps']} | {r['train_words_per_s']:.0f} | "
                     f"{r['dev_float32']:.2f} | {r['dev_bfloat16']:.2f} | {r['dev_bfloat16'] - r['dev_float32']:+.2f} |")
    report = "\n".join(lines)
    print(report)
    common.save_json({"machine": common.machine_info(), "rows": rows}, common.RESULTS / f"{common.stamped('dtype_accuracy')}.json")


if __name__ == "__main__":
    main()
