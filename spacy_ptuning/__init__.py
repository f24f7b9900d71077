"""spacy-ptuning: P-Tuning v2, P-Tuning v1 and prompt tuning for spaCy over a
frozen Hugging Face transformer that all adapters share.

The package has one folder per layer, each importing only from the layers
below it (and from ``errors``):

* ``model/``: torch. The backbone and its families, prefix injection, the
  prompt modules, the adapter, the one prompted pass (``encode``), the layer
  mix, backbone identity and the saved adapter format.
* ``pipeline/``: thinc and spaCy. The registered architectures, the thinc
  layer over an adapter, word features, precomputed vectors and the
  components (factories).
* ``serving/``: the adapter pool, mixed-adapter batches, the batcher (no
  HTTP), the HTTP API module (schemas, status mapping, result JSON), the
  server's settings and the FastAPI server.
* ``ray/``: Ray Serve and Ray Data over the same pool and API module.

``cli`` (the ``spacy ptuning`` commands) sits on top of all of them.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from .errors import PTuningError
from .model.adapter import Adapter
from .model.backbone import DEFAULT_BACKBONE, Backbone, load_backbone
from .pipeline.architectures import ptuning_transformer_v1, ptuning_transformer_v2
from .pipeline.components import (
    make_ptuning_ner,
    make_ptuning_ner_tagger,
    make_ptuning_textcat,
    make_ptuning_textcat_multilabel,
    trainable_summary,
)
from .pipeline.transformer_model import get_adapter

__version__ = "0.1.0"
__all__ = [
    "Adapter",
    "DEFAULT_BACKBONE",
    "PTuningError",
    "Backbone",
    "get_adapter",
    "load_backbone",
    "make_ptuning_ner",
    "make_ptuning_ner_tagger",
    "make_ptuning_textcat",
    "make_ptuning_textcat_multilabel",
    "ptuning_transformer_v1",
    "ptuning_transformer_v2",
    "trainable_summary",
]

# Where the modules of release 0.1.0 (one flat package) live now. Their old
# names keep importing, as the very same module objects (one copy of each
# module's state), so user code and pickles naming them keep working.
MOVED = {
    "backbone": "model.backbone",
    "injection": "model.injection",
    "prompts": "model.methods",
    "adapter": "model.adapter",
    "identity": "model.identity",
    "serialization": "model.serialization",
    "architectures": "pipeline.architectures",
    "transformer_model": "pipeline.transformer_model",
    "components": "pipeline.components",
    "pool": "serving.pool",
    "mixed_batch": "serving.mixed_batch",
    "batcher": "serving.batcher",
    "api": "serving.api",
    "serve_config": "serving.serve_config",
    "server": "serving.server",
    "ray_serve": "ray.serve",
    "ray_data": "ray.data",
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import spacy_ptuning.<old name>`` imports the module at its new
    place and binds the old name to it (imported only when asked for: the
    serving and Ray modules need their optional extras)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__  # importlib sets the old name's spec on it next
        return module

    def exec_module(self, module):
        # Already executed at its new place: give it back its own spec.
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModule())
