"""The saved adapter: prompts as safetensors plus the backbone's identity,
in a msgpack envelope; never pickle.

:class:`AdapterShim` is thinc's PyTorchShim with its own ``to_bytes`` /
``from_bytes``: thinc's would pickle the whole torch module (and with it a
reference to the backbone); ours saves only the prompt tensors and checks,
on load, that the backbone in memory is the one the adapter was trained on.
"""
import srsly
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from thinc.api import PyTorchShim

from .adapter import Adapter
from .errors import AdapterError, Errors
from .identity import describe_fingerprint

ADAPTER_FORMAT = "spacy-ptuning-adapter/1"


class AdapterShim(PyTorchShim):
    """PyTorchShim that saves only the prompts, as safetensors, with the
    backbone's fingerprint; loading checks it and never unpickles."""

    def to_bytes(self) -> bytes:
        module: Adapter = self._model
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        return srsly.msgpack_dumps(
            {
                "format": ADAPTER_FORMAT,
                "backbone": module.backbone.name,
                "fingerprint": module.backbone.fingerprint(),
                "method": module.method,
                "num_virtual_tokens": module.num_virtual_tokens,
                "weights": st_save(tensors),
            }
        )

    def from_bytes(self, bytes_data: bytes) -> "AdapterShim":
        module: Adapter = self._model
        try:
            msg = srsly.msgpack_loads(bytes_data)
            if not isinstance(msg, dict) or msg.get("format") != ADAPTER_FORMAT:
                raise ValueError("missing the spacy-ptuning adapter header")
            tensors = st_load(msg["weights"])
            expected = msg["fingerprint"]
        except Exception as e:
            raise AdapterError(Errors.E008.format(detail=f"{type(e).__name__}: {e}")) from e
        found = module.backbone.fingerprint()
        if expected != found:
            raise AdapterError(
                Errors.E006.format(
                    difference="architecture" if expected.get("architecture") != found.get("architecture") else "weights",
                    expected=describe_fingerprint(expected),
                    found=describe_fingerprint(found),
                    name=module.backbone.name,
                )
            )
        try:
            module.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            detail = f"method={msg.get('method')}, num_virtual_tokens={msg.get('num_virtual_tokens')} saved; {e}"
            raise AdapterError(Errors.E007.format(detail=detail)) from e
        module.to(module.backbone.device)
        return self
