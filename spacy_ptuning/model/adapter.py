"""The adapter: one task's trainable prompts over the shared frozen backbone.

:class:`Adapter` owns only the prompt parameters. It *borrows* the shared
frozen backbone: the backbone is not a registered submodule, so it is not in
``parameters()``/``state_dict()``, never reaches the optimizer and is never
saved. Its forward pass is the prompted pass of ``encode.py`` (the one a
mixed-adapter server batch runs too): length-sorted groups of similar
length, the prompts injected as key/value prefixes (``injection.py``) or
put in front of the text as input embeddings.
"""
import copy
from typing import List, Optional

import torch

from .backbone import Backbone, load_backbone
from ..errors import AdapterError, ConfigError, Errors
from .encode import encode_rows, length_groups, rows_of_batch  # noqa: F401  (length_groups: its 0.1.0 home)
from .layer_mix import ScalarMix, resolve_layers
from .methods import MIN_TEXT_POSITIONS, MethodSettings, settings_for  # noqa: F401  (MIN_TEXT_POSITIONS: its 0.1.0 home)


class FixedPrompts(torch.nn.Module):
    """An adapter's prompts computed once (:meth:`Adapter.compact`): one
    buffer, ``prompts.row`` in the adapter's state, no parameters. A float32
    row (exactly what the prompt module computed) or a float16 one (a
    storage dtype asked for) can be saved, as a serving copy
    (``serialization.COMPACTED_FORMAT``); a row rounded to the backbone's
    bfloat16 cannot."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.register_buffer("row", row.detach().clone(memory_format=torch.contiguous_format))

    @property
    def savable(self) -> bool:
        """Whether the row is held as computed (float32, the prompt module's
        own dtype) or in the float16 storage a user chose (``compact
        --storage-dtype``, the pool's ``storage_dtype``), not rounded to a
        bfloat16 backbone's dtype as a side effect."""
        return self.row.dtype in (torch.float32, torch.float16)

    def forward(self) -> torch.Tensor:
        return self.row


class Adapter(torch.nn.Module):
    """One task's trainable continuous prompts over a borrowed frozen backbone.

    ``forward(input_ids, attention_mask, token_type_ids)`` returns the last
    hidden states of the real wordpieces only, shape (batch, length, width).
    """

    def __init__(
        self,
        backbone: Backbone,
        method: str = "prefix",
        num_virtual_tokens: int = 16,
        prefix_projection: int = 0,
        prompt_encoder: str = "lstm",
        prompt_dropout: float = 0.0,
        max_batch_tokens: int = 4096,
        *,
        layer_mix: Optional[List[int]] = None,
        requested_dtype: Optional[str] = None,
        **options,
    ):
        """``method`` and its options make the method's settings
        (``methods``): the built-in methods' options by name, as in release
        0.1.0, any other registered method's as keyword ``options``; options
        of other methods are accepted at their defaults."""
        super().__init__()
        settings = settings_for(
            method, num_virtual_tokens, prompt_dropout,
            prefix_projection=prefix_projection, prompt_encoder=prompt_encoder, **options,
        )
        settings.check()
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 0:
            raise ConfigError(
                Errors.E012.format(option="max_batch_tokens", rule="0 (no grouping) or a positive number of wordpieces", value=max_batch_tokens)
            )
        settings.check_backbone(backbone)
        self.settings: MethodSettings = settings
        self._backbone = [backbone]  # a list, so torch does not register it
        # The dtype setting the backbone was loaded with: "auto" is resolved
        # again for the device the adapter moves to (see _apply).
        self.requested_dtype = requested_dtype
        self.max_batch_tokens = max_batch_tokens
        # Padding efficiency: real wordpieces / positions sent to the backbone.
        self.tokens_real = 0
        self.tokens_sent = 0
        self.method = settings.name
        self.input_prompts = settings.input_prompts
        self.num_virtual_tokens = settings.num_virtual_tokens
        self.prompts: torch.nn.Module = settings.build(backbone)
        # The hidden states read out (layer_mix.py); None: the last layer alone,
        # and no parameter (adapters saved before the mix load unchanged).
        layers = resolve_layers(layer_mix, backbone.num_layers)
        self.mix: Optional[ScalarMix] = ScalarMix(layers) if layers is not None else None
        self._prompt_cache: Optional[tuple] = None
        self.to(backbone.device)

    def invalidate_prompt_cache(self) -> None:
        self._prompt_cache = None

    @property
    def compacted(self) -> bool:
        """Whether :meth:`compact` replaced the prompt module."""
        return isinstance(self.prompts, FixedPrompts)

    def compact(self, dtype: Optional[str] = None) -> int:
        """For inference only (a server's resident adapter, a serving copy):
        replace the prompt module (a P-Tuning v1 encoder, a prefix MLP, free
        prompt parameters) by the one row of prompts it computes, and free
        its weights; returns the bytes freed.

        ``dtype``: None holds the row in the backbone's dtype (no cast at
        use). "float16" holds it in float16 where that takes fewer bytes
        than the backbone's dtype (a float32 backbone; a bfloat16 row stays
        as it is), cast to the backbone's at each use: half the bytes, the
        predictions those of the row rounded to float16. "float32" holds the
        row exactly as the module computes it (its parameters are float32):
        the form a compacted adapter is saved in (``spacy ptuning compact``;
        on a bfloat16 backbone twice the bytes of None, cast at each use).
        On a compacted adapter, None and "float16" convert the row held to
        fewer bytes, never to more.

        The adapter predicts exactly as before (the same row that
        :meth:`prompt_row` caches at inference, cast the same way), but it
        can no longer be trained (PT-E049), and it saves as its row
        (``serialization.COMPACTED_FORMAT``) unless the row is held in a
        bfloat16 backbone's dtype.
        Why: a P-Tuning v1 encoder or a reparameterised prefix holds 10-30x
        the bytes of the prompts it produces, and a server holding thousands
        of adapters needs only the prompts. Compact after placing the adapter
        on its device: with no parameters left, a later ``.to(device)``
        cannot tell which shared backbone to rebind to."""
        storage = None if dtype is None else _torch_dtype(dtype)
        backbone_dtype = self.backbone.model.dtype
        if self.compacted:
            row = self.prompts.row
            before = row.numel() * row.element_size()
            target = backbone_dtype if storage is None else storage
            if target.itemsize >= row.element_size():
                return 0  # never more bytes a value (a bfloat16 row stays as it is)
        else:
            before = sum(t.numel() * t.element_size() for t in self.prompts.parameters())
            training = self.training
            self.eval()
            with torch.no_grad():
                row = self.prompts().float()  # what prompt_row casts to the backbone's dtype
            self.train(training)
            if storage == torch.float32:
                target = torch.float32
            elif storage is not None and storage.itemsize < backbone_dtype.itemsize:
                target = storage
            else:
                target = backbone_dtype
        row = row.to(target)
        self.prompts = FixedPrompts(row)
        self._prompt_cache = None
        return before - row.numel() * row.element_size()

    def row_shape(self) -> tuple:
        """The shape of this adapter's prompt row: (V, embed_width) input
        prompts or (layers, 2, P, kv_width) prefixes (see :meth:`prompt_row`)."""
        bb = self.backbone
        if self.input_prompts:
            return (self.num_virtual_tokens, bb.embed_width)
        return (bb.num_layers, 2, self.num_virtual_tokens, bb.kv_width)

    def prompt_row(self) -> torch.Tensor:
        """This adapter's prompts for one row, in the backbone's dtype:
        (V, embed_width) input prompts or (layers, 2, P, kv_width) prefixes
        (``encode.py`` places them per row; dropout, if any, draws one mask
        per forward call, shared by all its rows and length groups). Cast once, before any row uses them, so that a
        half-precision backbone never gets a float32 copy per row. At
        inference (eval mode, no grad) they are computed once and reused
        until a parameter changes: torch's version counters see in-place
        edits and ``load_state_dict``; thinc's optimizers write through array
        views that they do not see, so the shim's ``finish_update`` calls
        :meth:`invalidate_prompt_cache`. The P-Tuning v1 LSTM or a prefix
        MLP would otherwise run for every batch."""
        if self.compacted:
            if self.training and torch.is_grad_enabled():
                raise AdapterError(Errors.E049.format(action="trained"))
            row = self.prompts.row
            dtype = self.backbone.model.dtype
            return row if row.dtype == dtype else row.to(dtype)
        if self.training or torch.is_grad_enabled():
            return self.prompts().to(self.backbone.model.dtype)
        key = tuple((id(p), p._version) for p in self.parameters())
        cache = self._prompt_cache
        if cache is None or cache[0] != key:
            # A copy, not a view of the parameters (contiguous: the prefix
            # modules give a permuted view), so that nothing aliases them.
            cache = self._prompt_cache = (key, self.prompts().to(self.backbone.model.dtype).clone(memory_format=torch.contiguous_format))
        return cache[1]

    def prompt_values(self, batch_size: int):
        """The prompts expanded to ``batch_size`` rows, in the layout HF
        attention takes: (batch, V, embed_width) input prompts, or one
        (key, value) pair of (batch, P, kv_width) per layer (what
        ``injection.injected_prefix`` and the tests' references take)."""
        row = self.prompt_row()
        if self.input_prompts:
            return row.unsqueeze(0).expand(batch_size, -1, -1)
        return [(layer[0].expand(batch_size, -1, -1), layer[1].expand(batch_size, -1, -1)) for layer in row]

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

    # Pickling and copying never duplicate the shared backbone. A pickle (what
    # nlp.pipe(n_process=...) sends to spawned workers; pickle.dumps(nlp))
    # holds the prompts and the backbone's load settings (name, revision,
    # dtype, device), and unpickling resolves the shared backbone with
    # load_backbone: in the same process the very same object, in another
    # process that process's shared copy, loaded from the same files. A pickle
    # is a transient transfer, not a storage format, so it carries no
    # fingerprint (nlp.to_disk/to_bytes do, and check it on load). A deep copy
    # (copy.deepcopy(nlp), thinc's Model.copy) copies the prompts and borrows
    # the same backbone object.

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["_prompt_cache"] = None
        bb = self.backbone
        state["_backbone"] = {
            "name": bb.name,
            "revision": bb.revision,
            "dtype": bb.dtype,
            "device": str(bb.device),
        }
        return state

    def __setstate__(self, state: dict) -> None:
        settings = state.get("_backbone")
        if isinstance(settings, dict):
            backbone = load_backbone(
                settings["name"],
                revision=settings["revision"],
                dtype=settings["dtype"],
                device=torch.device(settings["device"]),
            )
            state = {**state, "_backbone": [backbone]}
        super().__setstate__(state)

    def __deepcopy__(self, memo: dict) -> "Adapter":
        memo[id(self.backbone)] = self.backbone  # shared, never copied
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            value = None if key == "_prompt_cache" else value  # recomputed on first use
            object.__setattr__(copied, key, copy.deepcopy(value, memo))
        return copied

    @property
    def max_length(self) -> int:
        """Most real wordpieces per sequence. Prefixes take no positions;
        input prompts occupy ``num_virtual_tokens`` of them."""
        if self.input_prompts:
            return self.backbone.max_length - self.num_virtual_tokens
        return self.backbone.max_length

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.cpu() on the adapter rebinds it to the shared copy
        # of its backbone on the new device (loaded there once if needed).
        result = super()._apply(fn, *args, **kwargs)
        params = list(self.parameters())
        if hasattr(self, "_backbone") and params:
            bb = self.backbone
            if params[0].device != bb.device:
                dtype = "auto" if self.__dict__.get("requested_dtype") == "auto" else bb.dtype
                self._backbone[0] = load_backbone(bb.name, revision=bb.revision, dtype=dtype, device=params[0].device)
        return result

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The prompted pass (``encode.py``) over length-sorted groups of
        similar length (less padding); the vectors come back in the input
        order and shape (batch, length, width), zeros where it is padded."""
        if token_type_ids is not None and not self.backbone.takes_token_types:
            token_type_ids = None
        rows = rows_of_batch(self, input_ids, attention_mask, token_type_ids)
        hidden, groups = encode_rows(self.backbone, rows, self.max_batch_tokens)
        lengths = [len(row.input_ids) for row in rows]
        self.tokens_real += sum(lengths)
        self.tokens_sent += sum(len(g) * max(1, max(lengths[i] for i in g)) for g in groups)
        batch_size, width = input_ids.shape
        out = hidden[0].new_zeros((batch_size, width, hidden[0].shape[-1]))
        for r, h in enumerate(hidden):
            out[r, attention_mask[r].bool()] = h
        return out

    def read_hidden(self, output, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This adapter's token vectors from a backbone pass, float32: its
        mix of hidden states (the pass must have been run with
        ``output_hidden_states``), or the last layer. ``rows``: only these
        rows of the pass (a mixed-adapter pass reads each adapter's rows)."""
        if self.mix is None:
            hidden = output.last_hidden_state
            return (hidden if rows is None else hidden[rows]).float()
        states = output.hidden_states if rows is None else [h[rows] for h in output.hidden_states]
        return self.mix(states)


# The dtypes a compacted row may be held in (a pool holds word-feature
# tables in the same one, and numpy has no bfloat16).
STORAGE_DTYPES = ("float32", "float16")


def _torch_dtype(name: str) -> torch.dtype:
    """A compacted row's storage dtype by name (PT-E054 for anything else)."""
    if name not in STORAGE_DTYPES:
        raise ConfigError(Errors.E054.format(value=name, why="", allowed=list(STORAGE_DTYPES)))
    return getattr(torch, name)

