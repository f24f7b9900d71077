"""Write a pipeline saved by this checkout's spacy-ptuning, and what it
predicts, for tests/test_saved.py: every later version must load it and
predict the same.

    python tests/data/make_saved.py tests/data/saved-0.1.0
    python tests/data/make_saved.py --v2 tests/data/saved-v2-4b8d50d

Run it from the checkout of the release being frozen (e.g. a git worktree
of the release commit); it writes OUT/pipeline (nlp.to_disk) and
OUT/expected.json. ``--v2`` builds the components on
PTuningTransformer.v2 (a layer mix and word features beside the
transformer) instead of v1. The backbone is the embedded MiniLM in float32 (results
equal across machines to ~1e-5); the prompts and heads are seeded noise
over an initialised pipeline (non-trivial predictions without training).
"""
import json
import sys
from pathlib import Path

import spacy
import torch
from spacy.training import Example
from spacy.util import fix_random_seed

try:
    from spacy_ptuning.pipeline.transformer_model import find_adapter_layers
except ImportError:  # the layout of release 0.1.0
    from spacy_ptuning.transformer_model import find_adapter_layers

TEXTS = [
    "Alice Smith visited Paris with the Acme Corporation board .",
    "Naloxone reversed the clonidine-induced hypotension in rats .",
    "a gripping , funny and beautifully acted film",
    "",
    "Oslo",
]
COMPONENTS = [  # (name, factory, method, virtual tokens)
    ("ner", "ptuning_ner", "prefix", 4),
    ("textcat", "ptuning_textcat", "prompt", 3),
]


V2 = {"@architectures": "spacy_ptuning.PTuningTransformer.v2", "layer_mix": [-1, -2],
      "word_features": {"@architectures": "spacy_ptuning.WordFeatures.v1", "width": 8}}


def main(out: Path, v2: bool = False) -> None:
    fix_random_seed(0)
    nlp = spacy.blank("en")
    for name, factory, method, n in COMPONENTS:
        tok2vec = {"@architectures": "spacy_ptuning.PTuningTransformer.v1", "method": method,
                   "num_virtual_tokens": n, "dtype": "float32", **(V2 if v2 else {})}
        nlp.add_pipe(factory, name=name, config={"model": {"tok2vec": tok2vec}})
    examples = [
        Example.from_dict(nlp.make_doc("Alice visited Paris"), {"entities": [(0, 5, "PER"), (14, 19, "LOC")], "cats": {"POS": 1.0, "NEG": 0.0}}),
        Example.from_dict(nlp.make_doc("a dull film"), {"entities": [], "cats": {"POS": 0.0, "NEG": 1.0}}),
    ]
    nlp.initialize(lambda: examples)
    gen = torch.Generator().manual_seed(0)
    for _, pipe in nlp.pipeline:
        for _, _, adapter in find_adapter_layers(pipe):
            with torch.no_grad():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for node in pipe.model.walk():  # the heads too (textcat's starts at zero)
            for param in node.param_names:
                if node.has_param(param):
                    value = node.get_param(param)
                    noise = torch.randn(value.shape, generator=gen).numpy().astype(value.dtype)
                    node.set_param(param, value + noise * 0.3)
    nlp.to_disk(out / "pipeline")
    expected = []
    for doc in spacy.load(out / "pipeline").pipe(TEXTS):
        expected.append({"text": doc.text, "ents": [[e.start_char, e.end_char, e.label_] for e in doc.ents],
                         "cats": doc.cats})
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[-1]), v2="--v2" in args)
