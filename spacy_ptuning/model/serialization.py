"""The saved adapter: prompts as safetensors plus the backbone's identity,
in a msgpack envelope; never pickle.

:class:`AdapterShim` is thinc's PyTorchShim with its own ``to_bytes`` /
``from_bytes``: thinc's would pickle the whole torch module (and with it a
reference to the backbone); ours saves only the prompt tensors and checks,
on load, that the backbone in memory is the one the adapter was trained on.

The envelope (format ``spacy-ptuning-adapter/2``) holds ``format``,
``backbone`` (the name it was trained with), ``fingerprint`` (see
``identity.py``), ``method``, ``num_virtual_tokens``, ``settings`` (every
setting of the method and the layer mix; informational, older files lack it),
``weights`` (the safetensors bytes) and ``weights_sha256`` (their checksum). Loading checks,
in order: the backbone's identity (E006), the checksum (E015), that the
tensors are finite (E014), and that they fit the configured prompts (E007).
Format /1 (no checksum, a sampled weight hash) still loads.

A compacted adapter (``Adapter.compact``, ``spacy ptuning compact``) saves
as format ``spacy-ptuning-adapter/3``: the same envelope with
``"compacted": true``, its weights the prompt row (``prompts.row``,
float32 as computed, or float16 in a copy asked for in float16) in place of
the prompt module's parameters. Loading puts the row in place of the module
the config built (same checks; E007 if its shape does not fit). A new format number, so that releases before it refuse
such a file with E016 (upgrade) instead of a missing-weights error.

thinc's ``Model.from_bytes`` sets every node's dims before it hands the shim
its bytes, so a backbone of another width would fail there first, as a
dimension clash; :func:`check_saved_backbone` reads the adapter headers out
of a component's saved model and checks identity before thinc's load (the
components call it first).
"""
import contextlib
import hashlib

import srsly
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from thinc.api import Model, PyTorchShim, torch2xp, xp2torch

from .adapter import Adapter, FixedPrompts
from .backbone import Backbone
from ..errors import AdapterError, Errors
from .identity import compare_fingerprints, compare_legacy, describe_fingerprint, legacy_fingerprint

FORMAT_PREFIX = "spacy-ptuning-adapter/"
ADAPTER_FORMAT = FORMAT_PREFIX + "2"
LEGACY_FORMAT = FORMAT_PREFIX + "1"
COMPACTED_FORMAT = FORMAT_PREFIX + "3"
KNOWN_FORMATS = (LEGACY_FORMAT, ADAPTER_FORMAT, COMPACTED_FORMAT)


def weights_checksum(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()


class AdapterShim(PyTorchShim):
    """PyTorchShim that saves only the prompts, as safetensors, with the
    backbone's fingerprint and a checksum; loading checks both and never
    unpickles."""

    def finish_update(self, optimizer) -> None:
        """thinc's optimizer step, keeping each parameter one tensor.

        PyTorchShim.finish_update rebinds ``param.data`` to a tensor made from
        the optimizer's result, a numpy view of the previous ``param.data``:
        each step adds a link (tensor -> array -> tensor) per parameter that
        is never freed, and training's memory grew by megabytes a step with
        ``prefix_projection``. Here the result is written into the parameter
        in place (nothing to write when the optimizer updated the view).
        thinc writes through array views, which torch's version counters do
        not see, so the adapter's inference cache is dropped."""
        for name, param in self._model.named_parameters():
            if param.grad is None:
                continue
            if not self._grad_scaler.found_inf:  # skip a step whose gradient overflowed
                weights, _ = optimizer((self.id, name), torch2xp(param.data), torch2xp(param.grad))
                updated = xp2torch(weights, device=param.device)
                if updated.data_ptr() != param.data.data_ptr():
                    param.data.copy_(updated)
            param.grad.zero_()
        self._grad_scaler.update()
        self._model.invalidate_prompt_cache()

    @contextlib.contextmanager
    def use_params(self, params):
        """Swap in the optimizer's parameter averages (``use_averages = true``)
        while the block runs, as spaCy does to score and save.

        Why not PyTorchShim's: thinc's optimizer keys a shim's parameters
        ``(shim.id, name)`` (see ``finish_update``), but PyTorchShim.use_params
        looks for string keys ``"pytorch_<id>_<name>"``, so it never finds
        them: the head's averages were used with the prompts' last weights,
        and the saved "best" pipeline paired the two. Here the averages are
        copied into the parameters in place (each stays one tensor; torch's
        version counters, which key the adapter's prompt cache, see the
        copies), and the weights are put back even if the block raises."""
        module: Adapter = self._model
        found = [(param, params[(self.id, name)]) for name, param in module.named_parameters()
                 if (self.id, name) in params]
        if not found:
            yield
            return
        backup = [param.detach().clone() for param, _ in found]
        with torch.no_grad():
            for param, average in found:
                param.copy_(xp2torch(average, device=param.device))
        try:
            yield
        finally:
            with torch.no_grad():
                for (param, _), saved in zip(found, backup):
                    param.copy_(saved)

    def to_bytes(self) -> bytes:
        module: Adapter = self._model
        if module.compacted and not module.prompts.savable:
            raise AdapterError(Errors.E049.format(action="saved (its prompt row is held rounded to the backbone's " + str(module.prompts.row.dtype).replace("torch.", "") + ")"))
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        weights = st_save(tensors)
        return srsly.msgpack_dumps(
            {
                "format": COMPACTED_FORMAT if module.compacted else ADAPTER_FORMAT,
                **({"compacted": True} if module.compacted else {}),  # format /2 files stay as they were
                "backbone": module.backbone.name,
                "fingerprint": module.backbone.fingerprint(),
                "method": module.method,
                "num_virtual_tokens": module.num_virtual_tokens,
                # Informational (readers ignore unknown keys): every setting
                # of the method, and the layer mix, if any.
                "settings": {**module.settings.to_dict(), "layer_mix": module.mix.layers if module.mix is not None else None},
                "weights": weights,
                "weights_sha256": weights_checksum(weights),
            }
        )

    def from_bytes(self, bytes_data: bytes) -> "AdapterShim":
        module: Adapter = self._model
        msg = read_header(bytes_data)
        check_backbone(msg, module.backbone)
        if msg["format"] != LEGACY_FORMAT:
            found = weights_checksum(msg["weights"])
            if found != msg.get("weights_sha256"):
                raise AdapterError(Errors.E015.format(expected=msg.get("weights_sha256"), found=found))
        try:
            tensors = st_load(msg["weights"])
        except Exception as e:
            raise AdapterError(Errors.E008.format(detail=f"{type(e).__name__}: {e}")) from e
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterError(Errors.E014.format(tensor=name))
        if msg["format"] == COMPACTED_FORMAT:
            # The row takes the place of the prompt module built from the
            # config; load_state_dict checks its shape against row_shape.
            saved = tensors.get("prompts.row")
            dtype = saved.dtype if saved is not None and saved.dtype in (torch.float32, torch.float16) else torch.float32
            module.prompts = FixedPrompts(torch.empty(module.row_shape(), dtype=dtype, device=module.backbone.device))
        try:
            module.load_state_dict(tensors, strict=True)
            module.invalidate_prompt_cache()
        except RuntimeError as e:
            detail = f"method={msg.get('method')}, num_virtual_tokens={msg.get('num_virtual_tokens')} saved; {e}"
            raise AdapterError(Errors.E007.format(detail=detail)) from e
        module.to(module.backbone.device)
        return self


def read_header(bytes_data: bytes) -> dict:
    """The adapter envelope, or E008 (unreadable) / E016 (a newer format)."""
    try:
        msg = srsly.msgpack_loads(bytes_data)
        fmt = msg.get("format") if isinstance(msg, dict) else None
        if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
            raise ValueError("missing the spacy-ptuning adapter header")
        if fmt in KNOWN_FORMATS:
            if not isinstance(msg.get("weights"), bytes) or not isinstance(msg.get("fingerprint"), dict):
                raise ValueError("the adapter header lacks its weights or fingerprint")
    except Exception as e:
        raise AdapterError(Errors.E008.format(detail=f"{type(e).__name__}: {e}")) from e
    if fmt not in KNOWN_FORMATS:
        raise AdapterError(Errors.E016.format(found=fmt, known=", ".join(KNOWN_FORMATS)))
    return msg


def check_backbone(msg: dict, backbone: Backbone) -> None:
    """E006, naming what differs and both backbones, unless the adapter in
    ``msg`` (a read header) was trained on this backbone."""
    expected = msg["fingerprint"]
    if msg["format"] == LEGACY_FORMAT:
        differences = compare_legacy(expected, backbone.model)
        found = legacy_fingerprint(backbone.model)
    else:
        found = backbone.fingerprint()
        differences = compare_fingerprints(expected, found, model=backbone.model)
    if differences:
        raise AdapterError(
            Errors.E006.format(
                difference="; ".join(differences),
                expected=f"{describe_fingerprint(expected)}, as saved from '{msg.get('backbone')}'",
                found=describe_fingerprint(found),
                name=backbone.name,
            )
        )


def check_saved_backbone(model: Model, model_bytes: bytes) -> None:
    """Check the backbone identity of every adapter in a component's saved
    model (thinc's msgpack) against ``model``'s, before thinc's own load,
    whose dimension checks would otherwise fail first on a backbone of
    another width. Data that thinc cannot read either is left to thinc's
    load to report."""
    try:
        msg = srsly.msgpack_loads(model_bytes)
        saved_shims = msg["shims"]
    except Exception:
        return
    nodes = list(model.walk())
    if not isinstance(saved_shims, list) or len(saved_shims) != len(nodes):
        return
    for node, saved in zip(nodes, saved_shims):
        for i, shim in enumerate(node.shims):
            if isinstance(shim, AdapterShim) and isinstance(saved, list) and i < len(saved):
                check_backbone(read_header(saved[i]), shim._model.backbone)

