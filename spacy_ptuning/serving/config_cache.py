"""Saved pipelines' configs, parsed once per distinct text.

Why this module exists: a pool that loads thousands of adapters saved from
one training config reads the same ``config.cfg`` text thousands of times,
and spaCy's load path parses it four times per load (the pool's tokenizer
key, ``load_config``, its interpolation, and ``Language.from_disk``, which
reads the file again to replace the pipeline's config by the text as saved).
All of it is Python holding the GIL, which warm requests wait for while a
cold adapter loads (``load_budget.py``). Here a text is parsed (and
interpolated with the pool's overrides) once; every load gets deep copies,
since a pipeline owns its config and the pool edits it (the tokenizer block).

Validation is not cached: confection's validation also coerces values to
their annotated types, so each build still runs it.
"""
import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Dict, Tuple

from confection import Config
from spacy.util import CONFIG_SECTION_ORDER


class ParsedConfigs:
    """The last ``size`` distinct config texts, each as the raw config (not
    interpolated: what ``Language.from_disk`` leaves in ``nlp.config``) and
    the config to build from (interpolated, with the overrides the pool
    derives from the raw one). Thread-safe."""

    def __init__(self, size: int = 256):
        self.size = size
        self._lock = threading.Lock()
        self._parsed: "OrderedDict[bytes, Tuple[Config, Config]]" = OrderedDict()

    def get(self, text: bytes, overrides_of: Callable[[Config], Dict[str, str]]) -> Tuple[Config, Config]:
        """(raw, to build from) for the config file's bytes ``text``, as
        copies the caller may change. ``overrides_of(raw)`` gives the
        overrides to apply (called once per text)."""
        key = hashlib.sha256(text).digest()
        with self._lock:
            parsed = self._parsed.get(key)
            if parsed is not None:
                self._parsed.move_to_end(key)
        if parsed is None:
            decoded = text.decode("utf8")
            # as spacy.util.load_config reads them
            raw = Config(section_order=CONFIG_SECTION_ORDER).from_str(decoded, interpolate=False)
            build = Config(section_order=CONFIG_SECTION_ORDER).from_str(decoded, overrides=overrides_of(raw))
            parsed = (raw, build)
            with self._lock:
                self._parsed[key] = parsed
                while len(self._parsed) > self.size:
                    self._parsed.popitem(last=False)
        return parsed[0].copy(), parsed[1].copy()
