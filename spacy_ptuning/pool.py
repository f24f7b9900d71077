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
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import spacy
from spacy.language import Language

from .errors import Errors, PTuningError
from .transformer_model import find_adapter_layers

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TASKS = {
    "ptuning_ner": "ner",
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
        self.checked = 0.0
        self.error: Optional[str] = None


class AdapterPool:
    """Named adapters over shared backbones; thread-safe.

    source: a folder holding one saved pipeline per subfolder (named after
        the subfolder; rescanned by :meth:`names`), a single pipeline folder,
        or a mapping name -> folder or installed package name.
    max_loaded: most pipelines kept loaded (least recently used dropped).
    check_interval: seconds between checks of a folder for changes (0: on
        every use; None: never reload).
    """

    def __init__(
        self,
        source: Union[str, Path, Mapping[str, Union[str, Path]], None] = None,
        *,
        max_loaded: int = 8,
        check_interval: Optional[float] = 1.0,
    ):
        if max_loaded < 1:
            raise ValueError(Errors.E030.format(value=max_loaded))
        self.max_loaded = max_loaded
        self.check_interval = check_interval
        self._root: Optional[Path] = None
        self._lock = threading.RLock()
        self._entries: Dict[str, _Entry] = {}
        self._loaded: "OrderedDict[str, Language]" = OrderedDict()
        self._backbones: Dict[int, object] = {}  # strong refs: evictions keep them
        self._tokenizers: Dict[str, object] = {}  # see _spacy_load
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
                self._loaded.pop(name, None)

    def remove(self, name: str) -> None:
        """Forget an adapter (requests holding it finish with it)."""
        with self._lock:
            self._entry(name)
            del self._entries[name]
            self._loaded.pop(name, None)
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
                    self._loaded.pop(name, None)
            for name, location in found.items():
                if name not in self._entries or self._entries[name].location != location:
                    self._entries[name] = _Entry(name, location)
                    self._loaded.pop(name, None)

    def _entry(self, name: str) -> _Entry:
        _check_name(name)
        with self._lock:
            entry = self._entries.get(name)
        if entry is None and self._root is not None:
            self._scan()  # a folder added since the last scan
            with self._lock:
                entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownAdapter(Errors.E033.format(name=name, known=known))
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
        folder changed, kept among the ``max_loaded`` most recently used."""
        entry = self._entry(name)
        now = time.monotonic()
        nlp = entry.nlp
        if nlp is not None and not self._due(entry, now):
            self._touch(name, nlp)
            return nlp
        with entry.lock:
            nlp = entry.nlp
            if nlp is None or self._due(entry, now):
                nlp = self._load(entry, now)
        self._touch(name, nlp)
        return nlp

    def _due(self, entry: _Entry, now: float) -> bool:
        if entry.nlp is None:
            return True
        if self.check_interval is None or now - entry.checked < self.check_interval:
            return False
        entry.checked = now
        return _signature(entry.location) != entry.signature

    def _load(self, entry: _Entry, now: float) -> Language:
        signature = _signature(entry.location)
        if entry.nlp is not None and signature == entry.signature:
            return entry.nlp
        start = time.perf_counter()
        try:
            nlp = self._spacy_load(entry.location)
        except Exception as e:
            entry.error = f"{type(e).__name__}: {e}"
            entry.checked = now
            with self._lock:
                self.stats["load_failures"] += 1
            if entry.nlp is not None:  # a failed reload: the old version keeps serving
                return entry.nlp
            raise AdapterLoadFailed(Errors.E034.format(name=entry.name, error=entry.error)) from e
        with self._lock:
            self.stats["load_seconds"] += time.perf_counter() - start
            self.stats["reloads" if entry.nlp is not None else "loads"] += 1
            for _, pipe in nlp.pipeline:
                for _, _, adapter in find_adapter_layers(pipe):
                    self._backbones[id(adapter.backbone)] = adapter.backbone
        entry.nlp, entry.signature, entry.checked, entry.error = nlp, signature, now, None
        return nlp

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
        key = _tokenizer_key(path) if path is not None else None
        with self._lock:
            shared = self._tokenizers.get(key) if key is not None else None
        if shared is None:
            nlp = spacy.load(location)
            if key is not None and nlp.vocab.vectors.shape[0] == 0:
                with self._lock:
                    self._tokenizers.setdefault(key, nlp.tokenizer)
            return nlp
        config = spacy.util.load_config(path / "config.cfg")
        own_tokenizer = config["nlp"]["tokenizer"]
        _SHARED_TOKENIZERS[f"{id(self)}:{key}"] = shared
        config["nlp"]["tokenizer"] = {"@tokenizers": "spacy_ptuning.pooled_tokenizer.v1", "key": f"{id(self)}:{key}"}
        nlp = spacy.util.load_model_from_config(config, vocab=shared.vocab, meta=spacy.util.get_model_meta(path))
        nlp.from_disk(path, exclude=["tokenizer"])
        nlp._config["nlp"]["tokenizer"] = own_tokenizer  # nlp.config / to_disk as saved
        return nlp

    def _touch(self, name: str, nlp: Language) -> None:
        with self._lock:
            if name not in self._entries:
                return
            self._loaded[name] = nlp
            self._loaded.move_to_end(name)
            while len(self._loaded) > self.max_loaded:
                old, _ = self._loaded.popitem(last=False)
                entry = self._entries.get(old)
                if entry is not None:
                    entry.nlp = None
                    entry.signature = None
                self.stats["evictions"] += 1

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
            "location": entry.location,
            "error": entry.error,
        }
        try:
            info["components"] = _components(nlp) if nlp is not None else _components_on_disk(entry.location)
        except Exception as e:  # an unreadable config: say so, list the rest
            info["components"] = []
            info["error"] = info["error"] or f"{type(e).__name__}: {e}"
        return info


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


_SHARED_TOKENIZERS: Dict[str, object] = {}


@spacy.util.registry.tokenizers("spacy_ptuning.pooled_tokenizer.v1")
def pooled_tokenizer(key: str):
    """The tokenizer an AdapterPool shares between pipelines (internal: the
    pool puts this in a loading config and restores the saved one after)."""

    def create(nlp: Language):
        return _SHARED_TOKENIZERS[key]

    return create


def _tokenizer_key(path: Path) -> Optional[str]:
    """Hash of what makes two saved pipelines tokenise identically: the
    config's [nlp] language and tokenizer settings, and the tokenizer and
    vocab files (strings excepted: the shared vocab's strings only grow)."""
    import hashlib

    config = spacy.util.load_config(path / "config.cfg", interpolate=False)
    nlp_block = {k: v for k, v in config["nlp"].items() if k in ("lang", "tokenizer")}
    digest = hashlib.sha256(repr(sorted(nlp_block.items())).encode("utf8"))
    for rel in ("tokenizer", "vocab/lookups.bin", "vocab/vectors.cfg", "vocab/key2row"):
        file = path / rel
        digest.update(rel.encode("utf8"))
        digest.update(file.read_bytes() if file.is_file() else b"-")
    return digest.hexdigest()[:32]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise InvalidAdapterName(Errors.E035.format(name=name))


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
