"""Registry lookups without rescans (spacy_ptuning/serving/registry_cache.py):
the same answers as catalogue and srsly give, and a load that no longer
walks the registry for every msgpack unpack (that one is in test_pool.py,
beside the pool's saved adapters)."""
import importlib.metadata

import catalogue
import srsly
import srsly.msgpack

from spacy_ptuning.serving import registry_cache


def _flat(available):
    if isinstance(available, dict):
        return [ep for group in dict.values(available) for ep in group]
    return list(available)


def test_grouped_entry_points_are_importlibs_by_group():
    fresh = importlib.metadata.entry_points()
    grouped = registry_cache.grouped_entry_points(fresh)
    entries = _flat(fresh)
    assert sum(len(v) for v in grouped.values()) == len(entries)
    for group in ("spacy_factories", "spacy_architectures", "console_scripts"):
        expected = sorted((ep.name, ep.value) for ep in entries if ep.group == group)
        assert sorted((ep.name, ep.value) for ep in grouped.get(group, [])) == expected
    assert registry_cache.grouped_entry_points(grouped) == grouped  # idempotent


def test_installed_registries_answer_as_before():
    registry_cache.install()
    registry_cache.install()  # a second install changes nothing
    assert isinstance(catalogue.AVAILABLE_ENTRY_POINTS, dict)
    factories = catalogue.Registry(("spacy", "factories"), entry_points=True)
    names = {ep.name for ep in factories._get_entry_points()}
    assert {"ptuning_ner", "ptuning_textcat", "ptuning_textcat_multilabel"} <= names
    decoders = srsly.msgpack.msgpack_decoders
    assert decoders.get_all() == catalogue.Registry.get_all(decoders)
    data = {"a": [1, 2], "b": b"x"}
    assert srsly.msgpack_loads(srsly.msgpack_dumps(data)) == data


def test_the_memo_sees_registrations_and_replacements():
    registry_cache.install()
    decoders = srsly.msgpack.msgpack_decoders
    key = ("srsly", "msgpack_decoders", "test-registry-cache")

    def first(obj, chain=None):
        return obj if chain is None else chain(obj)

    def second(obj, chain=None):
        return obj if chain is None else chain(obj)

    try:
        assert "test-registry-cache" not in decoders.get_all()
        decoders.register("test-registry-cache", func=first)
        assert decoders.get_all()["test-registry-cache"] is first
        decoders.register("test-registry-cache", func=second)  # same name, same size of the registry
        assert decoders.get_all()["test-registry-cache"] is second
        returned = decoders.get_all()
        returned.clear()  # callers get their own dict
        assert "test-registry-cache" in decoders.get_all()
    finally:
        catalogue.REGISTRY.pop(key, None)
    assert "test-registry-cache" not in decoders.get_all()


def test_argument_schemas_are_built_once_per_function_and_still_validate():
    import pytest
    from confection import ConfigValidationError
    from confection.validation import Schema
    from spacy.util import registry

    registry_cache.install()

    def f(width: int = 3, name: str = "x"):
        return width

    def g(width: float):
        return width

    a = Schema.from_function(f)
    assert Schema.from_function(f) is a and set(a.model_fields) == {"width", "name"}
    assert not a.model_fields["width"].is_required()
    b = Schema.from_function(g)  # another function: its own schema
    assert b is not a and set(b.model_fields) == {"width"} and b.model_fields["width"].is_required()
    own = Schema.from_function(f, config={"extra": "allow"})  # a config of its own: built, not memoised
    assert own is not a and Schema.from_function(f) is a

    @registry.misc("spacy_ptuning_test_schema_memo.v1")
    def width_of(width: int):
        return width

    for _ in range(2):  # the second resolve uses the memoised schema: still filled and validated
        assert registry.resolve({"x": {"@misc": "spacy_ptuning_test_schema_memo.v1", "width": 3}})["x"] == 3
        with pytest.raises(ConfigValidationError):
            registry.resolve({"x": {"@misc": "spacy_ptuning_test_schema_memo.v1", "width": "wide"}})
        with pytest.raises(ConfigValidationError):
            registry.resolve({"x": {"@misc": "spacy_ptuning_test_schema_memo.v1"}})
