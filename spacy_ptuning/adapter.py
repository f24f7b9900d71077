"""The adapter: one task's trainable prompts over the shared frozen backbone.

:class:`Adapter` owns only the prompt parameters. It *borrows* the shared
frozen backbone: the backbone is not a registered submodule, so it is not in
``parameters()``/``state_dict()``, never reaches the optimizer and is never
saved. The forward pass runs the backbone on length-sorted groups of similar
length (:func:`length_groups`), with the prompts injected as key/value
prefixes (``injection.py``) or as input embeddings.
"""
import copy
from typing import List, Optional

import torch

from .backbone import Backbone, load_backbone
from .errors import ConfigError, Errors
from .injection import injected_prefix
from .layer_mix import ScalarMix, resolve_layers
from .prompts import METHODS, Method

# Input-prompt methods must leave at least this many positions for the text
# (special tokens included): fewer cannot hold a sentence of a few words.
MIN_TEXT_POSITIONS = 16


def _check_settings(
    backbone: Backbone,
    method: str,
    num_virtual_tokens: int,
    options: dict,
    prompt_dropout: float,
    max_batch_tokens: int,
) -> Method:
    """Refuse settings that cannot work, before anything is built."""
    if method not in METHODS:
        raise ConfigError(Errors.E003.format(method=method, choices=", ".join(METHODS)))
    spec = METHODS[method]
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ConfigError(Errors.E004.format(n=num_virtual_tokens))
    for option, value in options.items():
        owners = [name for name, m in METHODS.items() if option in m.options]
        default = METHODS[owners[0]].options[option]
        if option not in spec.options and value != default:
            raise ConfigError(
                Errors.E011.format(option=option, value=value, method=method, used_by=", ".join(owners))
            )
    if method == "prompt_encoder" and options["prompt_encoder"] not in ("lstm", "mlp"):
        raise ConfigError(Errors.E005.format(kind=options["prompt_encoder"]))
    if not isinstance(options["prefix_projection"], int) or options["prefix_projection"] < 0:
        raise ConfigError(
            Errors.E012.format(option="prefix_projection", rule="0 (none) or a positive hidden size", value=options["prefix_projection"])
        )
    if not 0.0 <= prompt_dropout < 1.0:
        raise ConfigError(Errors.E012.format(option="prompt_dropout", rule="in [0, 1)", value=prompt_dropout))
    if not isinstance(max_batch_tokens, int) or max_batch_tokens < 0:
        raise ConfigError(
            Errors.E012.format(option="max_batch_tokens", rule="0 (no grouping) or a positive number of wordpieces", value=max_batch_tokens)
        )
    if spec.input_prompts and backbone.max_length - num_virtual_tokens < MIN_TEXT_POSITIONS:
        raise ConfigError(
            Errors.E013.format(
                method=method,
                n=num_virtual_tokens,
                left=max(0, backbone.max_length - num_virtual_tokens),
                max_length=backbone.max_length,
                minimum=MIN_TEXT_POSITIONS,
                most=max(0, backbone.max_length - MIN_TEXT_POSITIONS),
            )
        )
    return spec


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
        layer_mix: Optional[List[int]] = None,
    ):
        super().__init__()
        options = {"prefix_projection": prefix_projection, "prompt_encoder": prompt_encoder}
        spec = _check_settings(backbone, method, num_virtual_tokens, options, prompt_dropout, max_batch_tokens)
        self._backbone = [backbone]  # a list, so torch does not register it
        self.max_batch_tokens = max_batch_tokens
        # Padding efficiency: real wordpieces / positions sent to the backbone.
        self.tokens_real = 0
        self.tokens_sent = 0
        self.method = method
        self.input_prompts = spec.input_prompts
        self.num_virtual_tokens = num_virtual_tokens
        self.prompts: torch.nn.Module = spec.build(backbone, num_virtual_tokens, options, prompt_dropout)
        # The hidden states read out (layer_mix.py); None: the last layer alone,
        # and no parameter (adapters saved before the mix load unchanged).
        layers = resolve_layers(layer_mix, backbone.num_layers)
        self.mix: Optional[ScalarMix] = ScalarMix(layers) if layers is not None else None
        self._prompt_cache: Optional[tuple] = None
        self.to(backbone.device)

    def invalidate_prompt_cache(self) -> None:
        self._prompt_cache = None

    def prompt_values(self, batch_size: int):
        """The prompts for ``batch_size`` rows, in the backbone's dtype: cast
        before the batch expansion, so a half-precision backbone gets a view
        of one (P, width) tensor per layer, not a float32 copy per row that
        each layer would cast again. At inference (eval mode, no grad) they
        are computed once and reused until a parameter changes: torch's
        version counters see in-place edits and ``load_state_dict``; thinc's
        optimizers write through array views that they do not see, so the
        shim's ``finish_update`` calls :meth:`invalidate_prompt_cache`. The
        P-Tuning v1 LSTM or a prefix MLP costs more than it should per batch."""
        if self.training or torch.is_grad_enabled():
            values = self._one_row()
        else:
            key = tuple((id(p), p._version) for p in self.parameters())
            cache = self._prompt_cache
            if cache is None or cache[0] != key:
                cache = self._prompt_cache = (key, self._one_row())
            values = cache[1]
        if self.input_prompts:
            return values.expand(batch_size, -1, -1)
        return [(k.expand(batch_size, -1, -1), v.expand(batch_size, -1, -1)) for k, v in values]

    def _one_row(self):
        """The prompts of one row (dropout, if any, is shared by the rows of
        a batch, as before the expansion), cast to the backbone's dtype."""
        dtype = self.backbone.model.dtype
        values = self.prompts(1)
        if self.input_prompts:
            return values.to(dtype)
        return [(k.to(dtype), v.to(dtype)) for k, v in values]

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
                dtype = "auto" if getattr(self, "requested_dtype", None) == "auto" else bb.dtype
                self._backbone[0] = load_backbone(bb.name, revision=bb.revision, dtype=dtype, device=params[0].device)
        return result

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the backbone on length-sorted groups of similar length (less
        padding), and return the hidden states in the input order and shape
        (batch, length, width); padding positions hold zeros."""
        lengths = [int(n) for n in attention_mask.sum(dim=1).tolist()]
        batch_size, width = input_ids.shape
        self.tokens_real += int(sum(lengths))
        if self.max_batch_tokens <= 0 or self.backbone.padding_side != "right":
            self.tokens_sent += batch_size * width
            return self._encode(input_ids, attention_mask, token_type_ids)
        groups = length_groups(lengths, self.max_batch_tokens)
        outputs, order = [], []
        for group in groups:
            n = max(1, max(lengths[i] for i in group))
            index = torch.tensor(group, device=input_ids.device)
            types = token_type_ids[index, :n] if token_type_ids is not None else None
            hidden = self._encode(input_ids[index, :n], attention_mask[index, :n], types)
            self.tokens_sent += len(group) * n
            outputs.append(torch.nn.functional.pad(hidden, (0, 0, 0, width - n)))
            order.extend(group)
        hidden = torch.cat(outputs)
        if order != sorted(order):  # back to the input order
            hidden = hidden[torch.argsort(torch.tensor(order, device=hidden.device))]
        return hidden

    def _encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        model = self.backbone.model
        batch_size = input_ids.shape[0]
        P = self.num_virtual_tokens
        ones = attention_mask.new_ones((batch_size, P))
        mask = torch.cat([ones, attention_mask], dim=1)
        extra = {}
        if not self.input_prompts:
            # Real tokens keep their own inputs, positions and token types; only
            # the keys/values (and the mask over them) grow by P.
            if token_type_ids is not None and self.backbone.takes_token_types:
                extra["token_type_ids"] = token_type_ids
            if not self.backbone.family.mask_includes_prefix:
                mask = attention_mask
            with injected_prefix(self.backbone, self.prompt_values(batch_size)):
                output = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=self.mix is not None, **extra)
            return self.read_hidden(output)
        embeds = model.get_input_embeddings()(input_ids)
        virtual = self.prompt_values(batch_size)
        if token_type_ids is not None and self.backbone.takes_token_types:
            zeros = token_type_ids.new_zeros((batch_size, P))
            extra["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)
        output = model(
            inputs_embeds=torch.cat([virtual, embeds], dim=1),
            attention_mask=mask,
            output_hidden_states=self.mix is not None,
            **extra,
        )
        # Drop the virtual positions before alignment to spaCy tokens.
        return self.read_hidden(output)[:, P:]

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


def length_groups(lengths: List[int], max_tokens: int, max_ratio: float = 1.5) -> List[List[int]]:
    """Indices grouped by similar length, shortest first: a group closes when
    its padded size would pass max_tokens or its longest sequence would be
    more than max_ratio times its shortest."""
    groups: List[List[int]] = []
    current: List[int] = []
    shortest = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = max(1, lengths[i])
        if current and ((len(current) + 1) * n > max_tokens or n > max_ratio * shortest):
            groups.append(current)
            current = []
        if not current:
            shortest = n
        current.append(i)
    if current:
        groups.append(current)
    return groups


