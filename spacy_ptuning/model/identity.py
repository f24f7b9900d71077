"""A backbone's identity: what a saved adapter records about the backbone it
was trained on, and how a load checks it.

A fingerprint has three parts, each compared on load:

architecture
    A few config values (model type, widths, layers, vocabulary size...);
    they must be equal.
tokenizer
    Hashes of the vocabulary (token -> id, added tokens included), of the
    segmentation model (BPE merges, unigram scores) and of the tokenizer's
    *behaviour*: the ids it gives a fixed probe text with capitals, accents,
    CJK, control characters, odd spaces and special-token strings. The probe
    captures the normalisation settings (lowercasing, accent stripping,
    Chinese-character splitting, prefix space...) and the special tokens
    added around a sequence, whatever the tokenizer's class or the
    ``tokenizers`` version that wrote its JSON; runtime state (truncation,
    padding) is left out. The hashes must be equal. A slow and a fast
    tokenizer of one WordPiece or BPE model agree.
weights
    A sketch of *every* floating-point tensor of the state dict, not a hash,
    so that float32, bfloat16 and float16 loads of one checkpoint, on CPU or
    CUDA, agree while a real change does not. Each tensor (in name order) is
    cut into chunks of ``CHUNK`` values; each chunk ``x`` is stored as its L2
    norm and its projection onto ``K`` fixed pseudo-random Gaussian vectors
    (one seeded ``(CHUNK, K)`` matrix ``G``, float32 on the backbone's device).
    ``x @ G`` has expected squared norm ``K * |x|^2``, so for two loads
    ``d = max(| |x1| - |x2| |, |(x1 - x2) @ G| / sqrt(K))`` estimates
    ``|x1 - x2|`` (the first term is an exact lower bound), and two loads
    agree when, for every chunk,
    ``d <= TOLERANCE * (max(|x1|, |x2|) + FLOOR * sqrt(n))``
    (``n`` values in the chunk; ``FLOOR`` absorbs float16's absolute
    rounding of subnormal values).

Why ``TOLERANCE = 2**-6``: rounding to bfloat16 moves each value by at most
2**-9 of itself (float16: 2**-11 in its normal range), so an honest dtype
difference is at most ~2**-9 of a chunk's norm, and typically ~2**-10;
the projection's chi(16) spread and the float16 storage of the
projections add less than a factor two. Measured on all-MiniLM-L6-v2 (103
tensors, 22.7M values, 429 chunks): the largest ratio over the nine
float32/bfloat16/float16 save/load pairs is 0.0025 (bfloat16 vs float16;
float32 vs float16: 0.0007), 6.2x below the tolerance (0.0156). Real
changes: one embedding row replaced by its neighbour 0.051-0.18 (the
lowest, 3.3x above, for two near-identical unused rows), by random values
0.11-0.22, set to zero 0.07-0.15; one layer's weights scaled by 1.05
0.060-0.069 (3.8x above); one LayerNorm bias shifted by 0.05: 0.46;
another model with the same per-tensor statistics: up to 2.0. A row of 384
values is ~1/170 of its chunk, so replacing it changes the chunk by ~0.1;
changes under ~2 % of a chunk (a scaling by 1.01, a tiny fine-tuning step)
pass unnoticed.

Cost: one float32 pass over the weights and a ``(chunks, CHUNK) @ (CHUNK,
K)`` product: 0.05-0.2 s for MiniLM's 90 MB on two busy CPU cores, in any
of the three dtypes; the tokenizer's part takes ~0.2 s. Size: 2 bytes per
projection value (normalised, float16) and 4 per norm: 20.8 KB for MiniLM
(msgpack), tensor names included. On CUDA the sketch is computed on the
GPU; float32 sums in another order, or with TF32 products (relative error
~2**-11), stay far inside the tolerance.

``legacy_fingerprint`` is the identity of adapter format /1 (a hash of 512
bfloat16-rounded samples per tensor); it is used only to check /1 files.
"""
import hashlib
import json
import math
import threading
import weakref
from typing import Dict, List, Optional

import numpy
import torch

SCHEME = "gaussian-projection/1"
CHUNK = 65536
K = 16
SEED = 20240519
TOLERANCE = 2.0**-6
FLOOR = 2.0**-11  # x TOLERANCE = 2**-17 per sqrt(value): float16 subnormal rounding
_BATCH = 32  # chunks per matmul (8 MB of float32)

ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)

# Text whose tokenisation shows the normalisation settings: capitals,
# accents (composed and decomposed), ligatures and full-width forms (NFKC),
# CJK, control and zero-width characters, odd spaces, numbers, punctuation,
# emoji, and the special-token strings of the common families.
PROBE = (
    "Hello World! HELLO world. hello",
    "Çà et là, naïve café — Ünïcödé ÅÉÎ ÑOÑO straße Ærø",
    "Cafe\u0301 re\u0301sume\u0301 ﬁne ﬂow Ｆｕｌｌ ｗｉｄｔｈ ①②",
    "中文字符 日本語のテキスト 한국어 текст Ελληνικά العربية",
    "  leading   spaces\tand\ttabs\nnew\r\nlines\u00a0nbsp\u2009thin\u3000ideographic ",
    "ctrl\x00\x07\x1b chars zero\u200bwidth\u200d join\ufeffbom",
    "Numbers 1234567.89 3,14 1e-5 -42 and symbols @#$%^&*()[]{}<>|\\/~`_+=",
    "don't won't can't I'm O'Neil's \"quoted\" 'single'",
    "https://example.com/a_b-c?d=e&f=g user@mail.org #tag @name",
    "emoji 🙂🚀👍🏽 and ® ™ © € £ ¥ ° ± µ",
    "[CLS] [SEP] [PAD] [UNK] [MASK] <s> </s> <pad> <unk> <mask> <|endoftext|> ▁",
    "unbelievably antidisestablishmentarianism pneumonoultramicroscopic",
)

_lock = threading.Lock()
_gaussians: Dict[tuple, torch.Tensor] = {}
_legacy: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


# -- the fingerprint ---------------------------------------------------------


def compute_fingerprint(model: torch.nn.Module, tokenizer=None) -> dict:
    """The identity stored with every saved adapter (see the module doc)."""
    return {
        "architecture": architecture(model),
        "tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else None,
        "weights": weight_sketch(model),
    }


def architecture(model: torch.nn.Module) -> dict:
    return {key: getattr(model.config, key, None) for key in ARCHITECTURE_KEYS}


def _sha(data) -> str:
    text = json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf8")).hexdigest()[:16]


# -- tokenizer ---------------------------------------------------------------


def tokenizer_identity(tokenizer) -> dict:
    """Hashes of the vocabulary, the segmentation model and the behaviour on
    ``PROBE``, plus a description (class, size, lowercasing) for messages."""
    backend = None
    backend_json: dict = {}
    if getattr(tokenizer, "is_fast", False):
        from tokenizers import Tokenizer

        text = tokenizer.backend_tokenizer.to_str()
        backend_json = json.loads(text)
        # A private copy: encoding with the shared tokenizer would change its
        # truncation/padding state under other threads.
        backend = Tokenizer.from_str(text)
        backend.no_truncation()
        backend.no_padding()
    vocab = sorted(tokenizer.get_vocab().items())
    if backend is not None:
        probe = [e.ids for e in backend.encode_batch(list(PROBE), add_special_tokens=True)]
    else:
        probe = [tokenizer.encode(t, add_special_tokens=True) for t in PROBE]
    return {
        "vocab": _sha(vocab),
        "model": _sha(_segmentation_model(tokenizer, backend_json)),
        "behaviour": _sha(probe),
        "class": type(tokenizer).__name__,
        "size": len(vocab),
        "lowercase": _lowercase(tokenizer, backend_json),
    }


def _segmentation_model(tokenizer, backend_json: dict) -> dict:
    """BPE merges or unigram scores, in one form for slow and fast tokenizers
    and for every ``tokenizers`` version (merges were once "a b" strings,
    now pairs); WordPiece and word-level models have only their vocabulary."""
    model = backend_json.get("model")
    if model is not None:
        kind = model.get("type") or ("BPE" if "merges" in model else "WordPiece")
        if kind == "BPE":
            merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
            return {"type": "BPE", "merges": merges}
        if kind == "Unigram":
            scores = [[p, float(numpy.float32(s))] for p, s in model.get("vocab", [])]
            return {"type": "Unigram", "scores": sorted(scores)}
        return {"type": kind}
    if hasattr(tokenizer, "bpe_ranks"):
        merges = [list(pair) for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda x: x[1])]
        return {"type": "BPE", "merges": merges}
    sp = getattr(tokenizer, "sp_model", None)
    if sp is not None:
        scores = [[sp.id_to_piece(i), float(numpy.float32(sp.get_score(i)))] for i in range(sp.get_piece_size())]
        return {"type": "Unigram", "scores": sorted(scores)}
    return {"type": "WordPiece" if hasattr(tokenizer, "wordpiece_tokenizer") else type(tokenizer).__name__}


def _lowercase(tokenizer, backend_json: dict) -> Optional[bool]:
    value = getattr(tokenizer, "do_lower_case", None)
    if isinstance(value, bool):
        return value
    normalizer = json.dumps(backend_json.get("normalizer"))
    if '"lowercase": true' in normalizer or '"type": "Lowercase"' in normalizer:
        return True
    if '"lowercase": false' in normalizer:
        return False
    return None


# -- weights -----------------------------------------------------------------


def _gaussian(chunk: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """The fixed projection matrix, drawn on CPU (the same on every machine)."""
    key = (chunk, k, seed, str(device))
    with _lock:
        g = _gaussians.get(key)
        if g is None:
            cpu = _gaussians.get((chunk, k, seed, "cpu"))
            if cpu is None:
                gen = torch.Generator().manual_seed(seed)
                cpu = torch.randn(chunk, k, generator=gen, dtype=torch.float32)
                _gaussians[(chunk, k, seed, "cpu")] = cpu
            g = _gaussians[key] = cpu.to(device)
    return g


@torch.no_grad()
def weight_sketch(model: torch.nn.Module, chunk: int = CHUNK, k: int = K, seed: int = SEED) -> dict:
    """Norm and ``k`` Gaussian projections of every ``chunk`` values of every
    floating tensor of the state dict, in float32 on the tensors' device."""
    tensors = sorted(
        ((n, t) for n, t in model.state_dict().items() if t.is_floating_point()), key=lambda item: item[0]
    )
    layout: List[list] = []
    norms: List[torch.Tensor] = []
    projections: List[torch.Tensor] = []
    for name, tensor in tensors:
        layout.append([name, list(tensor.shape)])
        flat = tensor.detach().reshape(-1)
        g = _gaussian(chunk, k, seed, flat.device)
        for start in range(0, flat.numel(), chunk * _BATCH):
            piece = flat[start : start + chunk * _BATCH].float()
            full = piece.numel() // chunk
            if full:
                rows = piece[: full * chunk].view(full, chunk)
                projections.append((rows @ g).cpu())
                norms.append(torch.linalg.vector_norm(rows, dim=1).cpu())
            rest = piece[full * chunk :]
            if rest.numel():
                projections.append((rest @ g[: rest.numel()]).view(1, k).cpu())
                norms.append(torch.linalg.vector_norm(rest).view(1).cpu())
    norm = torch.cat(norms).numpy().astype("<f4") if norms else numpy.zeros(0, "<f4")
    proj = torch.cat(projections).numpy() if projections else numpy.zeros((0, k), "f4")
    with numpy.errstate(divide="ignore", invalid="ignore"):
        unit = numpy.where(norm[:, None] > 0, proj / norm[:, None], 0.0)
    return {
        "scheme": SCHEME,
        "chunk": chunk,
        "k": k,
        "seed": seed,
        "tensors": layout,
        "norms": norm.tobytes(),
        "projections": unit.astype("<f2").tobytes(),
    }


def _chunk_sizes(sketch: dict) -> List[List[int]]:
    """Per tensor, the number of values in each of its chunks."""
    chunk = sketch["chunk"]
    sizes = []
    for _, shape in sketch["tensors"]:
        n = math.prod(shape)
        sizes.append([min(chunk, n - s) for s in range(0, n, chunk)])
    return sizes


def weight_ratios(expected: dict, found: dict) -> numpy.ndarray:
    """Per chunk, the estimated change relative to the chunk's norm (see the
    module doc); two loads agree when every ratio is <= TOLERANCE. The
    sketches must have the same scheme and layout."""
    k = expected["k"]
    ne = numpy.frombuffer(expected["norms"], "<f4").astype("f8")
    nf = numpy.frombuffer(found["norms"], "<f4").astype("f8")
    pe = numpy.frombuffer(expected["projections"], "<f2").astype("f8").reshape(-1, k) * ne[:, None]
    pf = numpy.frombuffer(found["projections"], "<f2").astype("f8").reshape(-1, k) * nf[:, None]
    n = numpy.array([s for sizes in _chunk_sizes(expected) for s in sizes], dtype="f8")
    with numpy.errstate(invalid="ignore", over="ignore"):
        change = numpy.maximum(numpy.abs(ne - nf), numpy.linalg.norm(pe - pf, axis=1) / math.sqrt(k))
        return change / (numpy.maximum(ne, nf) + FLOOR * numpy.sqrt(n))


def _same_scheme(a: dict, b: dict) -> bool:
    return all(a.get(key) == b.get(key) for key in ("scheme", "chunk", "k", "seed"))


# -- comparing ---------------------------------------------------------------


def compare_fingerprints(
    expected: dict, found: dict, model: Optional[torch.nn.Module] = None, tolerance: float = TOLERANCE
) -> List[str]:
    """What differs between two fingerprints, as phrases for a message; empty
    when they agree. ``model`` (the found backbone) lets a sketch saved with
    other sketch settings be recomputed with those."""
    if expected == found:  # the common case, an adapter on the backbone it was saved from: one C-level compare
        return []
    differences = []
    arch_e, arch_f = expected.get("architecture") or {}, found.get("architecture") or {}
    changed = [f"{key} {arch_e.get(key)} vs {arch_f.get(key)}" for key in ARCHITECTURE_KEYS if arch_e.get(key) != arch_f.get(key)]
    if changed:
        differences.append("the architecture differs (" + ", ".join(changed) + ")")
    tok_e, tok_f = expected.get("tokenizer"), found.get("tokenizer")
    if tok_e is not None and tok_f is not None:
        parts = []
        if tok_e.get("vocab") != tok_f.get("vocab"):
            parts.append(f"vocabulary: {tok_e.get('size')} vs {tok_f.get('size')} tokens, hash {tok_e.get('vocab')} vs {tok_f.get('vocab')}")
        if tok_e.get("model") != tok_f.get("model"):
            parts.append("merges/scores")
        if tok_e.get("behaviour") != tok_f.get("behaviour"):
            how = "normalisation or special tokens"
            if tok_e.get("lowercase") != tok_f.get("lowercase"):
                how += f": lowercase {tok_e.get('lowercase')} vs {tok_f.get('lowercase')}"
            parts.append(how)
        if parts:
            differences.append("the tokenizer differs (" + "; ".join(parts) + ")")
    sketch_e, sketch_f = expected.get("weights"), found.get("weights")
    if sketch_e is not None and sketch_f is not None:
        if not _same_scheme(sketch_e, sketch_f) and model is not None:
            sketch_f = weight_sketch(model, sketch_e["chunk"], sketch_e["k"], sketch_e["seed"])
        differences.extend(_weight_differences(sketch_e, sketch_f, tolerance))
    return differences


def _weight_differences(expected: dict, found: dict, tolerance: float) -> List[str]:
    if not _same_scheme(expected, found):
        return [f"the weight sketch scheme differs ({expected.get('scheme')} vs {found.get('scheme')})"]
    if expected["tensors"] != found["tensors"]:
        shapes_e = {n: s for n, s in expected["tensors"]}
        shapes_f = {n: s for n, s in found["tensors"]}
        parts = []
        missing = [n for n in shapes_e if n not in shapes_f]
        extra = [n for n in shapes_f if n not in shapes_e]
        reshaped = [f"'{n}' {shapes_e[n]} vs {shapes_f[n]}" for n in shapes_e if n in shapes_f and shapes_e[n] != shapes_f[n]]
        if missing:
            parts.append(f"{len(missing)} saved tensors missing, e.g. '{missing[0]}'")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors, e.g. '{extra[0]}'")
        if reshaped:
            parts.append("shapes " + ", ".join(reshaped[:3]) + (f" and {len(reshaped) - 3} more" if len(reshaped) > 3 else ""))
        return ["the weight tensors differ (" + "; ".join(parts) + ")"]
    ratios = weight_ratios(expected, found)
    bad = []
    start = 0
    for (name, _), sizes in zip(expected["tensors"], _chunk_sizes(expected)):
        r = ratios[start : start + len(sizes)]
        start += len(sizes)
        over = ~(r <= tolerance)  # NaN counts as a change
        if over.any():
            worst = float(numpy.nanmax(r)) if not numpy.isnan(r).all() else float("nan")
            bad.append((worst if not math.isnan(worst) else math.inf, name, int(over.sum()), len(sizes)))
    if not bad:
        return []
    bad.sort(reverse=True)
    listed = ", ".join(
        f"'{name}' ({n} of {total} chunks, by up to {100 * worst:.1f} %)" for worst, name, n, total in bad[:3]
    )
    more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
    return [
        f"the weights differ in {listed}{more} (a change is measured against its "
        f"chunk's norm; float32, bfloat16 and float16 loads of one backbone differ "
        f"by under {100 * tolerance:.1f} %)"
    ]


def describe_fingerprint(fp: dict) -> str:
    """One line for error messages: architecture, tokenizer, weights."""
    arch = fp.get("architecture") or {}
    text = (
        f"{arch.get('model_type')} (hidden {arch.get('hidden_size')}, "
        f"{arch.get('num_hidden_layers')} layers, vocab {arch.get('vocab_size')}"
    )
    tok = fp.get("tokenizer")
    if tok:
        case = {True: ", lowercase", False: ", cased"}.get(tok.get("lowercase"), "")
        text += f"; tokenizer {tok.get('class')} {tok.get('size')} tokens{case}, vocab {tok.get('vocab')}, behaviour {tok.get('behaviour')}"
    sketch = fp.get("weights")
    if isinstance(sketch, dict):
        norms = numpy.frombuffer(sketch["norms"], "<f4").astype("f8")
        values = sum(math.prod(shape) for _, shape in sketch["tensors"])
        text += f"; {len(sketch['tensors'])} weight tensors, {values:,} values, norm {math.sqrt(float((norms ** 2).sum())):.5g}"
    if fp.get("weights_sha256"):
        text += f", weights {fp['weights_sha256']}"
    return text + ")"


# -- adapter format /1 -------------------------------------------------------


def legacy_fingerprint(model: torch.nn.Module) -> dict:
    """The identity adapter format /1 stored: the architecture and a hash of
    512 bfloat16-rounded samples per tensor. Used only to check /1 files: it
    misses most weights and disagrees between float16 and float32 loads."""
    cached = _legacy.get(model)
    if cached is not None:
        return cached
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
    result = {"architecture": architecture(model), "weights_sha256": digest.hexdigest()[:20]}
    _legacy[model] = result
    return result


def compare_legacy(expected: dict, model: torch.nn.Module) -> List[str]:
    found = legacy_fingerprint(model)
    differences = []
    if expected.get("architecture") != found["architecture"]:
        arch_e, arch_f = expected.get("architecture") or {}, found["architecture"]
        changed = [f"{k} {arch_e.get(k)} vs {arch_f.get(k)}" for k in ARCHITECTURE_KEYS if arch_e.get(k) != arch_f.get(k)]
        differences.append("the architecture differs (" + ", ".join(changed) + ")")
    elif expected.get("weights_sha256") != found["weights_sha256"]:
        differences.append("the weights differ (sampled hash, adapter format /1)")
    return differences
