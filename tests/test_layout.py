"""The package's layout holds: layers import only downward, the module
names of release 0.1.0 still import (as the same modules), a method is one
registered settings class, and precomputed vectors never stay on a doc."""
import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import spacy_ptuning
from spacy_ptuning.model.methods import MethodSettings, method_names, register

PACKAGE = Path(spacy_ptuning.__file__).parent
LAYERS = ["model", "pipeline", "serving", "ray"]  # bottom to top


def _imported_layers(path: Path):
    """The layers a module imports (relative or absolute imports of ours)."""
    here = path.relative_to(PACKAGE).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level])
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:
                    target += [a.name for a in node.names]
            elif node.module and node.module.startswith("spacy_ptuning."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target and target[0] in LAYERS:
                found.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "spacy_ptuning" and len(parts) > 1 and parts[1] in LAYERS:
                    found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_downward(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        above = _imported_layers(path) - allowed
        assert not above, f"{path.relative_to(PACKAGE)} imports {sorted(above)}, a layer above {layer}/"


def test_the_walk_finds_imports_of_every_kind(tmp_path):
    """The check above sees relative, package-relative and absolute imports."""
    source = "from ..serving.pool import X\nfrom .. import ray\nimport spacy_ptuning.pipeline.components\n"
    fake = PACKAGE / "model" / "_fake_for_test.py"
    fake.write_text(source)
    try:
        assert _imported_layers(fake) == {"serving", "ray", "pipeline"}
    finally:
        fake.unlink()


@pytest.mark.parametrize("old", sorted(spacy_ptuning.MOVED))
def test_release_0_1_module_names_import_the_moved_modules(old):
    if old in ("ray_serve", "ray_data"):
        pytest.importorskip("ray")
    legacy = importlib.import_module(f"spacy_ptuning.{old}")
    moved = importlib.import_module(f"spacy_ptuning.{spacy_ptuning.MOVED[old]}")
    assert legacy is moved
    assert moved.__spec__.name == f"spacy_ptuning.{spacy_ptuning.MOVED[old]}"


class _Constant(nn.Module):
    def __init__(self, n, width, value):
        super().__init__()
        self.value = nn.Parameter(torch.full((n, width), float(value)))

    def forward(self):
        return self.value


def test_a_method_is_one_registered_settings_class(tiny_bert):
    """A method defined here (as another package would, under the
    spacy_ptuning_methods entry point) builds, validates and runs through
    the adapter and the mixed-batch pass with no other change."""
    from spacy_ptuning.errors import ConfigError
    from spacy_ptuning.model.adapter import Adapter
    from spacy_ptuning.model.backbone import load_backbone

    @register("constant_prompt_for_test")
    @dataclass
    class ConstantPrompt(MethodSettings):
        value: float = 0.5
        input_prompts = True

        def validate_options(self):
            if self.value < 0:
                raise ConfigError("value must be >= 0")

        def build(self, backbone):
            return _Constant(self.num_virtual_tokens, backbone.embed_width, self.value)

    try:
        assert "constant_prompt_for_test" in method_names()
        backbone = load_backbone(tiny_bert, dtype="float32")
        adapter = Adapter(backbone, "constant_prompt_for_test", num_virtual_tokens=3, value=0.25)
        assert adapter.input_prompts and adapter.settings.value == 0.25
        assert torch.equal(adapter.prompt_row(), torch.full((3, backbone.embed_width), 0.25))
        with pytest.raises(ConfigError, match="value must be"):
            Adapter(backbone, "constant_prompt_for_test", value=-1.0)
        # An option of another method at a non-default value: PT-E011.
        with pytest.raises(ConfigError, match="PT-E011"):
            Adapter(backbone, "constant_prompt_for_test", prefix_projection=8)
        with torch.no_grad():
            enc = backbone.tokenizer(["carol met dave", "oslo"], padding=True, return_tensors="pt")
            out = adapter(enc["input_ids"], enc["attention_mask"])
        assert out.shape[:2] == enc["input_ids"].shape
    finally:  # drop the test's entry from catalogue's registry
        from catalogue import REGISTRY

        REGISTRY.pop(("spacy_ptuning", "methods", "constant_prompt_for_test"), None)
    assert "constant_prompt_for_test" not in method_names()


def test_precomputed_vectors_never_stay_on_a_doc(tiny_bert):
    """pipe_mixed carries vectors on the docs while the components run and
    removes them after, also when a component raises."""
    from spacy.language import Language

    from spacy_ptuning.pipeline.precomputed import KEY
    from spacy_ptuning.serving.mixed_batch import pipe_mixed

    from .helpers import pipeline

    nlp = pipeline(tiny_bert, "ptuning_ner", "prefix", 4, 1)
    docs = pipe_mixed([(nlp, "alice visited paris"), (nlp, "bob")])
    assert all(not any(isinstance(k, tuple) and k[0] == KEY for k in doc.user_data) for doc in docs)

    @Language.component("fail_after_ner_for_test")
    def fail(doc):
        assert any(isinstance(k, tuple) and k[0] == KEY for k in doc.user_data)  # there while running
        raise RuntimeError("boom")

    nlp.add_pipe("fail_after_ner_for_test")
    given = [nlp.make_doc("carol met dave")]
    with pytest.raises(RuntimeError, match="boom"):
        pipe_mixed([(nlp, given[0])])
    assert not any(isinstance(k, tuple) and k[0] == KEY for k in given[0].user_data)


def test_a_copied_model_predicts_and_mixes_like_the_original(tiny_bert):
    """thinc's Model.copy() (spaCy's replace_listeners calls it) keeps what
    the serving path reads of the tok2vec's tree (it drops named refs)."""
    import numpy

    from spacy_ptuning.pipeline.transformer_model import find_adapter_layers
    from spacy_ptuning.serving.mixed_batch import MixedStats, _mixed_vectors

    from .helpers import pipeline

    nlp = pipeline(tiny_bert, "ptuning_ner", "prefix", 4, 1)
    (tok2vec, _, _), = find_adapter_layers(nlp.get_pipe("ptuning_ner"))
    copied = tok2vec.copy()
    docs = [nlp.make_doc(t) for t in ("alice visited paris", "bob")]
    for a, b in zip(tok2vec.predict(docs), copied.predict(docs)):
        numpy.testing.assert_allclose(a, b, atol=1e-6)
    (node, transformer, adapter), = [f for f in find_adapter_layers(type("C", (), {"model": copied})())]
    mixed = _mixed_vectors([(node, transformer, adapter, docs)], 4096, MixedStats())
    for doc, expected in zip(docs, copied.predict(docs)):
        numpy.testing.assert_allclose(mixed[(id(node), id(doc))], expected, atol=1e-5)
