"""Registry lookups that do not rescan every installed package on each call.

Why this module exists: loading one adapter pipeline asks catalogue's
registries for names a few hundred times (spaCy's factories and
architectures, confection's resolution of the config, and srsly's msgpack,
which asks for *all* its decoders on every unpack: 30 or more times per
pipeline in thinc's ``from_bytes``). With catalogue 2.0 on Python 3.10-3.11
each of those calls filters every entry point of every installed
distribution (``SelectableGroups.select`` flattens and matches all of
them), and each ``get_all`` also walks the whole ``catalogue.REGISTRY``.
That was over half of an adapter's load time once the backbone is shared
(``AdapterPool.get`` on 39 perturbed copies in one process: a median of
63-88 ms a load before, 27-31 ms after), and all of it Python holding the
GIL, which is what makes cold loads slow down the warm requests served
beside them (``load_budget.py``, ``bench/serve_cold.py``).

:func:`install`, once per process (the adapter pool calls it), changes three
things and nothing they return:

- ``catalogue.AVAILABLE_ENTRY_POINTS`` (the snapshot catalogue takes of the
  entry points when it is imported) becomes the same entry points grouped
  in a dict, which catalogue reads with one lookup (its branch for
  ``importlib_metadata`` versions that return a dict).
- srsly's ``msgpack_encoders`` / ``msgpack_decoders`` remember the result
  of ``get_all`` while ``catalogue.REGISTRY`` holds the same functions under
  the same names (any registration or removal makes it look again).
- confection's ``Schema.from_function`` (the argument schema of a
  registered function, built from its signature and type hints: about 16
  per adapter load, one per block of its config) is built once per
  function. Validation itself still runs on every build, against the same
  schema; only the schema's construction is reused. A function whose
  annotations are changed after its first use would keep its first schema.

None of them can be upstreamed as a setting: catalogue has no cache of its
own, srsly calls ``get_all`` inside ``unpackb``, and confection rebuilds
the schema inside every resolve.
"""
import threading
from typing import Any, Dict, List, Tuple

import catalogue

_lock = threading.Lock()
_installed = False


def install() -> None:
    """Index catalogue's entry points and memoise srsly's msgpack hooks
    (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        catalogue.AVAILABLE_ENTRY_POINTS = grouped_entry_points(catalogue.AVAILABLE_ENTRY_POINTS)
        import srsly.msgpack

        for registry in (srsly.msgpack.msgpack_encoders, srsly.msgpack.msgpack_decoders):
            registry.get_all = _memoised_get_all(registry)
        _memoise_schemas()
        _installed = True


def grouped_entry_points(available: Any) -> Dict[str, List[Any]]:
    """``{group: [entry points]}`` from what ``importlib.metadata.entry_points()``
    returned: a dict of groups (Python 3.10-3.11), an ``EntryPoints``
    sequence (3.12+) or an already grouped dict."""
    if isinstance(available, dict):
        entries = [ep for group in dict.values(available) for ep in group]
    else:
        entries = list(available)
    out: Dict[str, List[Any]] = {}
    for ep in entries:
        out.setdefault(ep.group, []).append(ep)
    return out


def _memoise_schemas() -> None:
    from confection.validation import Schema

    original = Schema.from_function.__func__  # the classmethod's function
    built: Dict[Tuple[Any, Any], Any] = {}

    def from_function(cls, func, *, config=None):
        if config is not None:
            return original(cls, func, config=config)
        key = (cls, func)
        try:
            schema = built.get(key)
        except TypeError:  # an unhashable callable
            return original(cls, func)
        if schema is None:
            schema = built.setdefault(key, original(cls, func))
        return schema

    from_function.__doc__ = original.__doc__
    Schema.from_function = classmethod(from_function)


def _memoised_get_all(registry: catalogue.Registry):
    original = registry.get_all  # the class's method, bound to this registry
    namespace = tuple(registry.namespace)
    state: Dict[str, Any] = {"size": -1, "own": (), "result": {}}

    def get_all() -> Dict[str, Any]:
        table = catalogue.REGISTRY
        own: Tuple = state["own"]
        if state["size"] != len(table) or any(table.get(key) is not value for key, value in own):
            result = original()
            size = len(table)
            own = tuple((key, value) for key, value in table.copy().items()
                        if len(key) == len(namespace) + 1 and key[:-1] == namespace)
            state.update(size=size, own=own, result=result)
        return dict(state["result"])

    get_all.__doc__ = original.__doc__
    return get_all
