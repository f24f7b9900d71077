"""The prompted encoder (torch) and its thinc wrapper.

:class:`PromptedEncoder` owns only the prompt parameters. It *borrows* the
shared frozen backbone: the backbone is not a registered submodule, so it is
not in ``parameters()``/``state_dict()``, never reaches the optimizer and is
never saved. :class:`AdapterShim` saves the prompt parameters as safetensors
plus the backbone's fingerprint, and checks the fingerprint on load.
"""
from typing import Callable, List, Optional, Tuple

import srsly
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from spacy.tokens import Doc, Span
from spacy_transformers.align import get_alignment, get_alignment_via_offset_mapping
from spacy_transformers.data_classes import FullTransformerBatch, WordpieceBatch
from spacy_transformers.layers.transformer_model import huggingface_tokenize
from spacy_transformers.truncate import truncate_oversize_splits
from thinc.api import ArgsKwargs, Model, PyTorchShim, xp2torch
from thinc.layers.pytorchwrapper import forward as pytorch_forward
from transformers.file_utils import ModelOutput

from .backbone import Backbone, describe_fingerprint, injected_prefix, load_backbone
from .errors import Errors
from .prompts import PrefixEncoder, PromptEncoder, SoftPrompt

METHODS = ("prefix", "prompt_encoder", "prompt")
ADAPTER_FORMAT = "spacy-ptuning-adapter/1"


class PromptedEncoder(torch.nn.Module):
    """A frozen backbone plus trainable continuous prompts.

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
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(Errors.E003.format(method=method))
        if num_virtual_tokens < 1:
            raise ValueError(Errors.E004.format(n=num_virtual_tokens))
        self._backbone = [backbone]  # a list, so torch does not register it
        self.max_batch_tokens = max_batch_tokens
        # Padding efficiency: real wordpieces / positions sent to the backbone.
        self.tokens_real = 0
        self.tokens_sent = 0
        self.method = method
        self.num_virtual_tokens = num_virtual_tokens
        P = num_virtual_tokens
        if method == "prefix":
            self.prompts: torch.nn.Module = PrefixEncoder(
                P, backbone.num_layers, backbone.kv_width, prefix_projection, prompt_dropout
            )
        elif method == "prompt_encoder":
            if prompt_encoder not in ("lstm", "mlp"):
                raise ValueError(Errors.E005.format(kind=prompt_encoder))
            self.prompts = PromptEncoder(
                P, backbone.embed_width, prompt_encoder, dropout=prompt_dropout
            )
        else:
            vocab = backbone.model.get_input_embeddings().weight
            rows = torch.randint(0, vocab.shape[0], (P,), generator=torch.Generator().manual_seed(0))
            self.prompts = SoftPrompt(vocab[rows.to(vocab.device)].cpu(), prompt_dropout)
        self.to(backbone.device)

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

    @property
    def max_length(self) -> int:
        """Most real wordpieces per sequence. Prefixes take no positions;
        input prompts occupy ``num_virtual_tokens`` of them."""
        if self.method == "prefix":
            return self.backbone.max_length
        return self.backbone.max_length - self.num_virtual_tokens

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.cpu() on the adapter rebinds it to the shared copy
        # of its backbone on the new device (loaded there once if needed).
        result = super()._apply(fn, *args, **kwargs)
        params = list(self.parameters())
        if hasattr(self, "_backbone") and params:
            bb = self.backbone
            if params[0].device != bb.device:
                self._backbone[0] = load_backbone(
                    bb.name, revision=bb.revision, dtype=bb.dtype, device=params[0].device
                )
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
        if self.max_batch_tokens <= 0 or self.backbone.tokenizer.padding_side != "right":
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
        if self.method == "prefix":
            # Real tokens keep their own inputs, positions and token types; only
            # the keys/values (and the mask over them) grow by P.
            if token_type_ids is not None and self.backbone.takes_token_types:
                extra["token_type_ids"] = token_type_ids
            if not self.backbone.family.mask_includes_prefix:
                mask = attention_mask
            with injected_prefix(self.backbone, self.prompts(batch_size)):
                output = model(input_ids=input_ids, attention_mask=mask, **extra)
            return output.last_hidden_state.float()
        embeds = model.get_input_embeddings()(input_ids)
        virtual = self.prompts(batch_size).to(embeds.dtype)
        if token_type_ids is not None and self.backbone.takes_token_types:
            zeros = token_type_ids.new_zeros((batch_size, P))
            extra["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)
        output = model(inputs_embeds=torch.cat([virtual, embeds], dim=1), attention_mask=mask, **extra)
        # Drop the virtual positions before alignment to spaCy tokens.
        return output.last_hidden_state[:, P:].float()


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


class AdapterShim(PyTorchShim):
    """PyTorchShim that saves only the prompts, as safetensors, with the
    backbone's fingerprint; loading checks it and never unpickles."""

    def to_bytes(self) -> bytes:
        module: PromptedEncoder = self._model
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
        module: PromptedEncoder = self._model
        try:
            msg = srsly.msgpack_loads(bytes_data)
            if not isinstance(msg, dict) or msg.get("format") != ADAPTER_FORMAT:
                raise ValueError("missing the spacy-ptuning adapter header")
            tensors = st_load(msg["weights"])
            expected = msg["fingerprint"]
        except Exception as e:
            raise ValueError(Errors.E008.format(detail=f"{type(e).__name__}: {e}")) from e
        found = module.backbone.fingerprint()
        if expected != found:
            raise ValueError(
                Errors.E006.format(
                    expected=describe_fingerprint(expected),
                    found=describe_fingerprint(found),
                    name=module.backbone.name,
                )
            )
        try:
            module.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            detail = f"method={msg.get('method')}, num_virtual_tokens={msg.get('num_virtual_tokens')} saved; {e}"
            raise ValueError(Errors.E007.format(detail=detail)) from e
        module.to(module.backbone.device)
        return self


def adapter_layer(module: PromptedEncoder) -> Model[WordpieceBatch, ModelOutput]:
    """Thinc layer around the prompted encoder (only the prompts train)."""
    return Model(
        "ptuning-adapter",
        pytorch_forward,
        attrs={"convert_inputs": _convert_inputs, "convert_outputs": _convert_outputs},
        shims=[AdapterShim(module)],
    )


def _convert_inputs(model: Model, wps: WordpieceBatch, is_train: bool):
    device = next(model.shims[0]._model.parameters()).device
    kwargs = {
        "input_ids": xp2torch(wps.input_ids, device=device),
        "attention_mask": xp2torch(wps.attention_mask, device=device),
    }
    if wps.token_type_ids is not None:
        kwargs["token_type_ids"] = xp2torch(wps.token_type_ids, device=device)
    return ArgsKwargs(args=(), kwargs=kwargs), lambda dX: []


def _convert_outputs(model: Model, inputs_outputs, is_train: bool):
    _, hidden = inputs_outputs

    def backprop(d_output: ModelOutput) -> ArgsKwargs:
        return ArgsKwargs(args=(hidden,), kwargs={"grad_tensors": d_output.values()})

    return ModelOutput(last_hidden_state=hidden), backprop


def ptuning_transformer_model(
    module: PromptedEncoder, get_spans: Callable
) -> Model[List[Doc], FullTransformerBatch]:
    """Docs -> FullTransformerBatch, like spacy-transformers' TransformerModel
    (same span getters, tokenisation and alignment) over a prompted encoder."""
    return Model(
        "ptuning-transformer",
        _transformer_forward,
        layers=[adapter_layer(module)],
        attrs={"get_spans": get_spans},
        dims={"nO": module.backbone.hidden_width},
    )


def get_module(model: Model) -> PromptedEncoder:
    """The PromptedEncoder inside any model built by this package."""
    for node in model.walk():
        for shim in node.shims:
            if isinstance(shim, AdapterShim):
                return shim._model
    raise ValueError("No spacy-ptuning adapter in this model.")


def _transformer_forward(
    model: Model, docs: List[Doc], is_train: bool
) -> Tuple[FullTransformerBatch, Callable]:
    adapter = model.layers[0]
    module: PromptedEncoder = adapter.shims[0]._model
    tokenizer = module.backbone.tokenizer
    nested_spans = model.attrs["get_spans"](docs)
    flat_spans = [span for doc_spans in nested_spans for span in doc_spans]
    if not flat_spans:  # only empty docs
        return FullTransformerBatch.empty(len(docs)), lambda d_output: docs
    while True:
        batch_encoding = huggingface_tokenize(tokenizer, [span.text for span in flat_spans])
        lengths = batch_encoding["attention_mask"].sum(axis=1)
        nested_spans, changed = _split_oversize(nested_spans, lengths, module.max_length)
        if not changed:
            break
        flat_spans = [span for doc_spans in nested_spans for span in doc_spans]
    wordpieces = WordpieceBatch.from_batch_encoding(batch_encoding)
    if "offset_mapping" in batch_encoding:
        align = get_alignment_via_offset_mapping(flat_spans, batch_encoding["offset_mapping"])
    else:
        align = get_alignment(flat_spans, wordpieces.strings, tokenizer.all_special_tokens)
    wordpieces, align = truncate_oversize_splits(wordpieces, align, module.max_length)
    model_output, backprop_adapter = adapter(wordpieces, is_train)
    output = FullTransformerBatch(
        spans=nested_spans, wordpieces=wordpieces, model_output=model_output, align=align
    )

    def backprop(d_output: FullTransformerBatch) -> List[Doc]:
        backprop_adapter(d_output.model_output)
        return docs

    return output, backprop


def _split_oversize(
    nested_spans: List[List[Span]], lengths, max_length: int
) -> Tuple[List[List[Span]], bool]:
    """Halve every span of several tokens whose wordpieces exceed max_length,
    so that every token gets a vector; single oversize tokens are left to
    spacy-transformers' truncate_oversize_splits."""
    result, i, changed = [], 0, False
    for doc_spans in nested_spans:
        fitted = []
        for span in doc_spans:
            if lengths[i] > max_length and len(span) > 1:
                middle = len(span) // 2
                fitted.extend([span[:middle], span[middle:]])
                changed = True
            else:
                fitted.append(span)
            i += 1
        result.append(fitted)
    return result, changed
