"""The adapter pool: named task adapters (saved spaCy pipelines), loaded on
first use, at most ``max_loaded`` at a time, over backbones loaded once.

A name maps to a pipeline folder written by ``nlp.to_disk``, an installed
``spacy package`` package, or a subfolder of a folder of such folders. The
pool loads on first use, drops the least recently used pipeline beyond
``max_loaded`` (its backbone stays: the pool holds every backbone it has
seen), and reloads a pipeline whose folder changed on disk. A reload builds
the new pipeline beside the old one and swaps them: requests in flight keep
the object they hold; if the new version fails to load, the old one keeps
serving and :meth:`AdapterPool.describe` reports the failure (as Triton's
model repository does on a failed reload).

Names are plain identifiers checked against what the pool knows; a request
never becomes a path.

Why our own: spaCy has no registry of loaded pipelines, and Ray Serve's
model multiplexing (the scale-out path) needs exactly this per replica: a
bounded LRU of models loaded by id.
"""
import hashlib
import os
import re
import threading
import uuid
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

import spacy
import srsly
from confection import Config
from spacy.language import Language

from ..errors import Errors, PTuningError
from ..model.adapter import STORAGE_DTYPES
from ..pipeline.compaction import compact_pipeline
from ..pipeline.transformer_model import find_adapter_layers
from . import registry_cache
from .config_cache import ParsedConfigs
from .gc_pauses import untie

# Loads of one folder that may each see it change (rewritten in place) before
# the pool gives up with PT-E052 (AdapterPool._consistent_load).
LOAD_ATTEMPTS = 3
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TASKS = {
    "ptuning_ner": "ner",
    "ptuning_ner_tagger": "ner",
    "ptuning_textcat": "textcat",
    "ptuning_textcat_multilabel": "textcat_multilabel",
}


class UnknownAdapter(PTuningError, KeyError):
    """No adapter of that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidAdapterName(PTuningError, ValueError):
    """A name that is not a plain identifier."""


class AdapterLoadFailed(PTuningError, RuntimeError):
    """The adapter exists but could not be loaded (the message says why)."""


class _Entry:
    def __init__(self, name: str, location: str):
        self.name = name
        self.location = location  # a folder, or an installed package's name
        self.lock = threading.Lock()  # one load at a time per adapter
        self.nlp: Optional[Language] = None
        self.signature: Optional[tuple] = None
        self.checked = float("-inf")  # when the folder was last compared with `signature`
        self.error: Optional[str] = None
        self.loading = False
        self.version = 0  # successful loads and reloads of this name
        self.bytes = 0  # what the loaded version holds (resident_bytes)
        # Negative cache: the folder version that failed to load, and when
        # the same version may be tried again (doubling backoff).
        self.failed_signature: Optional[tuple] = None
        self.retry_at = 0.0
        self.backoff = 0.0

    @property
    def state(self) -> str:
        """READY (a version serves), LOADING (a first load runs), FAILED (the
        last load failed and no version serves) or UNLOADED."""
        if self.nlp is not None:
            return "READY"
        if self.loading:
            return "LOADING"
        return "FAILED" if self.error is not None else "UNLOADED"


class AdapterPool:
    """Named adapters over shared backbones; thread-safe.

    source: a folder holding one saved pipeline per subfolder (named after
        the subfolder; rescanned by :meth:`names`), a single pipeline folder,
        or a mapping name -> folder or installed package name.
    max_loaded: most pipelines kept loaded (least recently used dropped).
    max_resident_mb: most megabytes of adapters kept loaded
        (:func:`resident_bytes` of each: prompts, heads, word features; the
        shared backbone and tokenizer not counted), least recently used
        dropped beyond; None: by count alone. An adapter larger than the
        budget fails to load with PT-E050.
    check_interval: seconds between checks of a folder for changes (0: on
        every use; None: never reload). A changed folder is reloaded; a
        deleted one makes the name unknown.
    retry_after_failure: an adapter that failed to load is not loaded again
        until its folder changes, or until this many seconds have passed
        (doubling after each failure of the same version, up to
        ``max_retry_after_failure``): a broken adapter costs one load, not
        one per request. Until then :meth:`get` raises the same
        :class:`AdapterLoadFailed` at once.
    dtype: load every spacy-ptuning component's backbone in this dtype
        (e.g. "float32", for results that do not depend on the batch's
        padding), whatever the saved config says; None: as saved.
    compact: replace each loaded adapter's prompt module by the prompts it
        computes (``Adapter.compact``): the same predictions in a fraction of
        the memory (a P-Tuning v1 encoder or a prefix MLP is freed), but the
        pipelines the pool hands out cannot be trained or saved.
    storage_dtype: with ``compact``, hold each adapter's prompt row and its
        word features' hash tables and maxout weights in this dtype
        ("float16": about half a resident adapter's bytes, computed in the
        backbone's dtype and float32 as before, ``pipeline/half_storage.py``;
        the predictions those of the values rounded to float16,
        ``bench/storage_accuracy.py``); None: as computed.
    clock: the time source (tests pass a fake one).
    """

    def __init__(
        self,
        source: Union[str, Path, Mapping[str, Union[str, Path]], None] = None,
        *,
        max_loaded: int = 8,
        max_resident_mb: Optional[float] = None,
        check_interval: Optional[float] = 1.0,
        retry_after_failure: float = 5.0,
        max_retry_after_failure: float = 300.0,
        dtype: Optional[str] = None,
        compact: bool = False,
        storage_dtype: Optional[str] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_loaded < 1:
            raise ValueError(Errors.E030.format(value=max_loaded))
        registry_cache.install()  # loads several times faster (see there)
        self.max_loaded = max_loaded
        if max_resident_mb is not None and not max_resident_mb > 0:
            raise ValueError(Errors.E051.format(value=max_resident_mb))
        self.max_resident_bytes = None if max_resident_mb is None else int(max_resident_mb * 2**20)
        self.resident_total = 0  # bytes of the loaded pipelines
        self.check_interval = check_interval
        self.retry_after_failure = retry_after_failure
        self.max_retry_after_failure = max(max_retry_after_failure, retry_after_failure)
        self.dtype = dtype
        self.compact = compact
        if storage_dtype not in (None, "float32") and (storage_dtype not in STORAGE_DTYPES or not compact):
            why = "" if storage_dtype in STORAGE_DTYPES else " (unknown dtype)"
            raise ValueError(Errors.E054.format(
                value=storage_dtype, allowed=list(STORAGE_DTYPES),
                why=why or " without compact=True (only a compacted adapter, never trained or saved, can be held rounded)"))
        self.storage_dtype = None if storage_dtype == "float32" else storage_dtype
        self._clock = clock
        self._root: Optional[Path] = None
        self._lock = threading.RLock()
        self._entries: Dict[str, _Entry] = {}
        self._loaded: "OrderedDict[str, Language]" = OrderedDict()
        self._sizes: Dict[str, int] = {}  # bytes of each pipeline in _loaded, as counted in resident_total
        self._backbones: Dict[int, object] = {}  # strong refs: evictions keep them
        self._tokenizers: Dict[str, object] = {}  # see _spacy_load
        self._strings_added: Set[Tuple[str, bytes]] = set()  # (tokenizer key, strings.json digest)
        self._configs = ParsedConfigs()  # see _spacy_load
        self._added: Dict[str, str] = {}  # add()/remove() outlive folder rescans
        self._removed: set = set()
        self.stats = {"loads": 0, "reloads": 0, "evictions": 0, "load_failures": 0, "load_seconds": 0.0}
        if isinstance(source, Mapping):
            for name, location in source.items():
                self.add(name, location)
        elif source is not None:
            root = Path(source)
            if not root.is_dir():
                raise FileNotFoundError(Errors.E031.format(path=root))
            if (root / "config.cfg").exists():
                self.add(_plain_name(root.name), root)
            else:
                self._root = root
                self._scan()

    @property
    def root(self) -> Optional[Path]:
        """The folder of adapter folders (None for a mapping or one pipeline)."""
        return self._root

    def states(self) -> Dict[str, Tuple[str, int]]:
        """Each known adapter's load state and version, without rescanning
        or loading anything."""
        with self._lock:
            return {name: (e.state, e.version) for name, e in self._entries.items()}

    # -- names -------------------------------------------------------------

    def names(self) -> List[str]:
        """Every adapter the pool knows, loaded or not (rescans the folder)."""
        self._scan()
        with self._lock:
            return sorted(self._entries)

    def add(self, name: str, location: Union[str, Path]) -> None:
        """Make a pipeline folder or installed package available as ``name``
        (replacing what the name meant before, at its next use)."""
        _check_name(name)
        location = str(location)
        if not (Path(location) / "config.cfg").exists() and not spacy.util.is_package(location):
            raise FileNotFoundError(Errors.E032.format(name=name, location=location))
        with self._lock:
            self._added[name] = location
            self._removed.discard(name)
            old = self._entries.get(name)
            if old is None or old.location != location:
                self._entries[name] = _Entry(name, location)
                self._unload(name)

    def remove(self, name: str) -> None:
        """Forget an adapter (requests holding it finish with it)."""
        with self._lock:
            self._entry(name)
            del self._entries[name]
            self._unload(name)
            self._added.pop(name, None)
            self._removed.add(name)

    def _scan(self) -> None:
        if self._root is None:
            return
        found = {}
        for child in sorted(self._root.iterdir()):
            if child.is_dir() and (child / "config.cfg").exists() and NAME.match(child.name):
                found[child.name] = str(child)
        with self._lock:
            for name in self._removed:
                found.pop(name, None)
            found.update(self._added)
        with self._lock:
            for name in list(self._entries):
                if name not in found:
                    del self._entries[name]
                    self._unload(name)
            for name, location in found.items():
                if name not in self._entries or self._entries[name].location != location:
                    self._entries[name] = _Entry(name, location)
                    self._unload(name)

    def _entry(self, name: str) -> _Entry:
        _check_name(name)
        with self._lock:
            entry = self._entries.get(name)
        if entry is None and self._root is not None:
            # A folder added since the last scan: looked up by its name, not
            # by rescanning (which costs a stat per folder: with thousands of
            # adapters on disk, every request for an unknown name would).
            folder = self._root / name
            if (folder / "config.cfg").exists():
                with self._lock:
                    if name not in self._removed:
                        entry = self._entries.setdefault(name, _Entry(name, str(folder)))
        if entry is None:
            raise UnknownAdapter(Errors.E033.format(name=name))
        return entry

    def require(self, name: str) -> None:
        """Raise what :meth:`get` would for a bad or unknown name
        (:class:`InvalidAdapterName`, :class:`UnknownAdapter`, with the same
        message), without loading anything: for front ends that route
        requests to pools elsewhere (``ray_serve``)."""
        self._entry(name)

    # -- loading -----------------------------------------------------------

    def get(self, name: str) -> Language:
        """The pipeline for ``name``: loaded on first use, reloaded when its
        folder changed (checked every ``check_interval`` seconds), kept among
        the ``max_loaded`` most recently used. Raises
        :class:`UnknownAdapter` once its folder is gone and
        :class:`AdapterLoadFailed` when it cannot be loaded."""
        entry = self._entry(name)
        nlp = self._resident(entry)
        if nlp is not None:
            return nlp
        nlp = entry.nlp
        due = self._check_due(entry)
        if nlp is None and entry.error is not None and not due and self._clock() < entry.retry_at:
            raise AdapterLoadFailed(Errors.E034.format(name=entry.name, error=entry.error))
        with entry.lock:
            nlp = entry.nlp
            if nlp is None or self._check_due(entry):
                nlp = self._load(entry)
        self._touch(name, nlp)
        return nlp

    def resident(self, name: str) -> Optional[Language]:
        """The pipeline for ``name`` if it is loaded and no check of its
        folder is due, else None: no disk access, no load, no waiting on a
        load in progress (a front end uses it to keep requests for resident
        adapters off the threads that load cold ones). A bad or unknown
        name is None too: :meth:`get` raises its error."""
        if not isinstance(name, str) or not NAME.match(name):
            return None
        with self._lock:
            entry = self._entries.get(name)
        return self._resident(entry) if entry is not None else None

    def is_loaded(self, name: str) -> bool:
        """Whether a version of ``name`` is loaded, even if a check of its
        folder is due: using it costs at most that check, not a load. No
        disk access; a bad or unknown name is False."""
        if not isinstance(name, str) or not NAME.match(name):
            return False
        with self._lock:
            entry = self._entries.get(name)
        return entry is not None and entry.nlp is not None

    def _resident(self, entry: _Entry) -> Optional[Language]:
        nlp = entry.nlp
        if nlp is None or self._check_due(entry):
            return None
        self._touch(entry.name, nlp)
        return nlp

    def _check_due(self, entry: _Entry) -> bool:
        """Whether the folder should be compared with the loaded version now
        (pure: the comparison itself, in ``_load``, records the check)."""
        if self.check_interval is None:
            return False
        return self._clock() - entry.checked >= self.check_interval

    def _load(self, entry: _Entry) -> Language:
        now = self._clock()
        signature = _signature(entry.location)
        entry.checked = now
        if signature is None and not spacy.util.is_package(entry.location):
            self._forget(entry)  # the folder was deleted: the name is gone
            raise UnknownAdapter(Errors.E033.format(name=entry.name))
        if entry.nlp is not None and signature == entry.signature:
            return entry.nlp
        if entry.error is not None and signature == entry.failed_signature and now < entry.retry_at:
            if entry.nlp is not None:  # a failed reload: the old version keeps serving
                return entry.nlp
            raise AdapterLoadFailed(Errors.E034.format(name=entry.name, error=entry.error))
        start = time.perf_counter()
        entry.loading = True
        try:
            nlp, signature = self._consistent_load(entry.location, signature)
            if self.compact:
                compact_pipeline(nlp, self.storage_dtype)
            # No reference cycle left: an evicted pipeline is freed by
            # refcounting, frozen (serve's Freezer) or not (gc_pauses.py).
            untie(nlp)
            size = resident_bytes(nlp)
            if self.max_resident_bytes is not None and size > self.max_resident_bytes:
                raise AdapterLoadFailed(Errors.E050.format(
                    mb=size / 2**20, budget=self.max_resident_bytes / 2**20))
        except Exception as e:
            entry.backoff = (
                min(entry.backoff * 2, self.max_retry_after_failure)
                if signature == entry.failed_signature and entry.backoff
                else self.retry_after_failure
            )
            entry.error = f"{type(e).__name__}: {e}"
            # The folder as it is now: a load that failed on a folder changing
            # under it (PT-E052) backs off until the folder changes again.
            entry.failed_signature, entry.retry_at = _signature(entry.location), now + entry.backoff
            with self._lock:
                self.stats["load_failures"] += 1
            if entry.nlp is not None:  # a failed reload: the old version keeps serving
                return entry.nlp
            raise AdapterLoadFailed(Errors.E034.format(name=entry.name, error=entry.error)) from e
        finally:
            entry.loading = False
        with self._lock:
            self.stats["load_seconds"] += time.perf_counter() - start
            self.stats["reloads" if entry.nlp is not None else "loads"] += 1
            for _, pipe in nlp.pipeline:
                for _, _, adapter in find_adapter_layers(pipe):
                    self._backbones[id(adapter.backbone)] = adapter.backbone
        entry.bytes = size
        entry.nlp, entry.signature, entry.error = nlp, signature, None
        entry.failed_signature, entry.backoff = None, 0.0
        entry.version += 1
        return nlp

    def _consistent_load(self, location: str, signature: Optional[Tuple]) -> Tuple[Language, Optional[Tuple]]:
        """The pipeline at ``location`` and the signature of the files it was
        read from. A folder rewritten in place while it loads could give a
        pipeline of old and new files (a config of one version, weights of
        another); so the signature is taken again after the load, and a
        load that saw the folder change is discarded and repeated, up to
        ``LOAD_ATTEMPTS`` times, then fails with PT-E052 (and the usual
        backoff)."""
        for _ in range(LOAD_ATTEMPTS):
            nlp = self._spacy_load(location)
            after = _signature(location)
            if after == signature:
                return nlp, signature
            signature = after
        raise AdapterLoadFailed(Errors.E052.format(location=location, attempts=LOAD_ATTEMPTS))

    def _forget(self, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(entry.name) is entry:
                del self._entries[entry.name]
            self._unload(entry.name)
            self._added.pop(entry.name, None)
        entry.nlp = None

    def _spacy_load(self, location: str) -> Language:
        """``spacy.load``, but pipelines whose language, tokenizer and vocab
        files are byte-identical to an already loaded one's (and that have no
        vectors) share its Vocab and Tokenizer.

        Why: building and loading spaCy's rule-based tokenizer is most of the
        cost of loading an adapter once the backbone is in memory (its
        special cases are compiled twice, from the config and from disk);
        sharing it makes a load several times faster and saves a Vocab per
        adapter. The shared tokenizer is the same rules over the same vocab,
        so docs are tokenised exactly as by the pipeline's own.
        """
        path = Path(location) if (Path(location) / "config.cfg").exists() else None
        if path is None:  # an installed package
            return spacy.load(location)
        raw, config = self._configs.get((path / "config.cfg").read_bytes(), self._overrides)
        key = _tokenizer_key(path, raw)
        with self._lock:
            shared = self._tokenizers.get(key)
        if shared is None:
            nlp = spacy.load(location, config=self._overrides(raw))
            if nlp.vocab.vectors.shape[0] == 0:
                with self._lock:
                    self._tokenizers.setdefault(key, nlp.tokenizer)
            return nlp
        own_tokenizer = config["nlp"]["tokenizer"]
        handover = uuid.uuid4().hex  # this load's own entry, removed when it is done
        _HANDOVER[handover] = shared
        config["nlp"]["tokenizer"] = {"@tokenizers": "spacy_ptuning.pooled_tokenizer.v1", "key": handover}
        try:
            nlp = spacy.util.load_model_from_config(config, vocab=shared.vocab, meta=spacy.util.get_model_meta(path))
        finally:
            _HANDOVER.pop(handover, None)
        # Not the vocab either: Vocab.from_disk would empty the shared vocab's
        # lexeme table (under the docs being tokenised with it) and copy its
        # whole string store, which grows with every text served; the
        # pipeline's own strings are added instead. Nor the config: what
        # Language.from_disk does with it (the pipeline's config becomes the
        # file's text, not interpolated) is done below from the parsed copy.
        nlp.from_disk(path, exclude=["tokenizer", "vocab", "config"])  # spaCy matches "config.cfg" by its stem
        nlp._config.clear()
        nlp._config.update(raw)
        nlp._config.is_interpolated = False
        strings = path / "vocab" / "strings.json"
        if strings.is_file():
            # Adapters saved from one training run carry the same strings
            # (thousands); a file already added to this vocab is not again.
            text = strings.read_bytes()
            seen = (key, hashlib.sha256(text).digest())
            if seen not in self._strings_added:
                for string in srsly.json_loads(text):
                    shared.vocab.strings.add(string)
                with self._lock:
                    self._strings_added.add(seen)
        nlp._config["nlp"]["tokenizer"] = own_tokenizer  # nlp.config / to_disk as saved
        return nlp

    def _overrides(self, config: Config) -> Dict[str, str]:
        """Config overrides for a saved pipeline's (raw) config: the pool's
        dtype for each spacy-ptuning component."""
        if self.dtype is None:
            return {}
        out = {}
        for name, block in config.get("components", {}).items():
            if block.get("factory") in TASKS and "tok2vec" in block.get("model", {}):
                out[f"components.{name}.model.tok2vec.dtype"] = self.dtype
        return out

    def _unload(self, name: str) -> None:
        """Under the lock: drop ``name`` from the loaded pipelines."""
        self._loaded.pop(name, None)
        self.resident_total -= self._sizes.pop(name, 0)

    def _touch(self, name: str, nlp: Language) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            if self._loaded.get(name) is not nlp:  # a load, or a reload taking the old version's place
                self._unload(name)
                self._loaded[name] = nlp
                self._sizes[name] = entry.bytes
                self.resident_total += entry.bytes
            self._loaded.move_to_end(name)
            budget = self.max_resident_bytes
            while len(self._loaded) > 1 and (
                len(self._loaded) > self.max_loaded or (budget is not None and self.resident_total > budget)
            ):
                old, _ = self._loaded.popitem(last=False)
                self.resident_total -= self._sizes.pop(old, 0)
                entry = self._entries.get(old)
                if entry is not None:
                    entry.nlp = None
                    entry.signature = None
                self.stats["evictions"] += 1

    @property
    def loads_done(self) -> int:
        """Successful loads and reloads so far (a Freezer's ``changes``)."""
        return self.stats["loads"] + self.stats["reloads"]

    @property
    def loaded(self) -> List[str]:
        with self._lock:
            return list(self._loaded)

    # -- description -------------------------------------------------------

    def describe(self, name: str) -> dict:
        """What an adapter is (tasks, labels, method, backbone), loaded or
        not; read from the saved config and meta when not loaded."""
        entry = self._entry(name)
        nlp = entry.nlp
        info = {
            "name": name,
            "loaded": nlp is not None,
            "state": entry.state,
            "version": entry.version,
            "location": entry.location,
            "error": entry.error,
        }
        try:
            info["components"] = _components(nlp) if nlp is not None else _components_on_disk(entry.location)
        except Exception as e:  # an unreadable config: say so, list the rest
            info["components"] = []
            info["error"] = info["error"] or f"{type(e).__name__}: {e}"
        return info


def resident_bytes(nlp: Language) -> int:
    """Bytes a loaded pipeline holds of its own: every thinc parameter of its
    components (heads, word features) and every tensor of its adapters
    (prompt parameters, or a compacted adapter's prompt buffer, and their
    inference cache); the shared backbone, vocab and tokenizer not counted."""
    total = 0
    for _, pipe in nlp.pipeline:
        model = getattr(pipe, "model", None)
        for node in model.walk() if model is not None else ():
            for name in node.param_names:
                if node.has_param(name):
                    total += node.get_param(name).nbytes
        for _, _, adapter in find_adapter_layers(pipe):
            tensors = list(adapter.parameters()) + list(adapter.buffers())
            cache = adapter.__dict__.get("_prompt_cache")
            tensors += [cache[1]] if cache is not None else []
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _components(nlp: Language) -> List[dict]:
    out = []
    for name, pipe in nlp.pipeline:
        layers = find_adapter_layers(pipe)
        if not layers:
            continue
        adapter = layers[0][2]
        factory = nlp.get_pipe_meta(name).factory
        out.append(
            {
                "name": name,
                "factory": factory,
                "task": TASKS.get(factory, factory),
                "labels": list(getattr(pipe, "labels", ())),
                "method": adapter.method,
                "num_virtual_tokens": adapter.num_virtual_tokens,
                "backbone": adapter.backbone.name,
            }
        )
    return out


def _components_on_disk(location: str) -> List[dict]:
    path = Path(location)
    if not (path / "config.cfg").exists():  # an installed package
        path = spacy.util.get_package_path(location)
        path = next((p.parent for p in path.glob("*/config.cfg")), path)
    config = spacy.util.load_config(path / "config.cfg", interpolate=False)
    meta = spacy.util.load_meta(path / "meta.json") if (path / "meta.json").exists() else {}
    labels = meta.get("labels", {})
    out = []
    for name, block in config.get("components", {}).items():
        factory = block.get("factory")
        if factory not in TASKS:
            continue
        tok2vec = block.get("model", {}).get("tok2vec", {})
        out.append(
            {
                "name": name,
                "factory": factory,
                "task": TASKS[factory],
                "labels": list(labels.get(name, [])),
                "method": tok2vec.get("method", "prefix"),
                "num_virtual_tokens": tok2vec.get("num_virtual_tokens"),
                "backbone": tok2vec.get("backbone"),
            }
        )
    return out


# Tokenizers being handed to a pipeline that is being built: a spaCy config can
# name a registered function but not pass an object, so the pool puts the
# shared tokenizer here under a key of its own for the one
# load_model_from_config call that resolves it, and removes it after.
_HANDOVER: Dict[str, object] = {}


@spacy.util.registry.tokenizers("spacy_ptuning.pooled_tokenizer.v1")
def pooled_tokenizer(key: str):
    """The tokenizer an AdapterPool shares between pipelines (internal: the
    pool puts this in a loading config and restores the saved one after)."""

    def create(nlp: Language):
        return _HANDOVER[key]

    return create


def _tokenizer_key(path: Path, config: Config) -> str:
    """Hash of what makes two saved pipelines tokenise identically: the
    [nlp] language and tokenizer settings of their (raw) config, and the
    tokenizer and vocab files (strings excepted: the shared vocab's strings
    only grow)."""
    import hashlib

    nlp_block = {k: v for k, v in config["nlp"].items() if k in ("lang", "tokenizer")}
    digest = hashlib.sha256(repr(sorted(nlp_block.items())).encode("utf8"))
    for rel in ("tokenizer", "vocab/lookups.bin", "vocab/vectors.cfg", "vocab/key2row"):
        file = path / rel
        digest.update(rel.encode("utf8"))
        digest.update(file.read_bytes() if file.is_file() else b"-")
    return digest.hexdigest()[:32]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:60] + f"... ({len(name)} characters)"
        raise InvalidAdapterName(Errors.E035.format(name=shown))


def _plain_name(name: str) -> str:
    plain = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("._-") or "adapter"
    return plain[:128]


def _signature(location: str) -> Optional[Tuple]:
    """What changes when a pipeline folder is rewritten: each file's path,
    size and modification time (a package has none: never reloaded)."""
    path = Path(location)
    if not path.is_dir():
        return None
    files = []
    for folder, _, names in os.walk(path):
        for file in names:
            full = os.path.join(folder, file)
            try:
                st = os.stat(full)
            except FileNotFoundError:  # being rewritten: looks changed
                continue
            files.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(files))
