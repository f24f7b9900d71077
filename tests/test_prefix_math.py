"""The maths of deep prefixes and input prompts, against HF's own code paths."""
import numpy
import pytest
import torch

from spacy_ptuning import Adapter, load_backbone
from spacy_ptuning.model.backbone import FAMILIES
from spacy_ptuning.pipeline.architectures import ptuning_transformer_v1

TEXTS = ["alice met bob in paris today", "the film", "good movie , really great plot and actor"]


def _encode(backbone, texts):
    enc = backbone.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")


def _randomise(module: Adapter, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _real_position_ids(backbone, input_ids):
    """The position ids the backbone gives real tokens when run without prefix."""
    cfg = backbone.config
    if not FAMILIES[cfg.model_type].position_offset:
        return torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    from transformers.models.roberta.modeling_roberta import create_position_ids_from_input_ids

    return create_position_ids_from_input_ids(input_ids, cfg.pad_token_id)


def _reference_with_past(backbone, module, input_ids, mask, token_types, position_ids):
    """HF's legacy past_key_values path with the same prefix keys/values."""
    B, P = input_ids.shape[0], module.num_virtual_tokens
    heads = backbone.config.num_attention_heads
    head_dim = backbone.kv_width // heads
    past = tuple(
        (
            k.reshape(B, P, heads, head_dim).transpose(1, 2),
            v.reshape(B, P, heads, head_dim).transpose(1, 2),
        )
        for k, v in module.prompt_values(B)
    )
    full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
    kwargs = {"token_type_ids": token_types} if token_types is not None else {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = backbone.model(
        input_ids=input_ids, attention_mask=full_mask, past_key_values=past, **kwargs
    )
    return out.last_hidden_state


@pytest.mark.parametrize("projection", [0, 24])
def test_prefix_equals_past_key_values_reference(past_kv_backbone, projection):
    backbone = load_backbone(past_kv_backbone)
    module = Adapter(backbone, "prefix", num_virtual_tokens=5, prefix_projection=projection)
    _randomise(module)
    module.eval()
    input_ids, mask, token_types = _encode(backbone, TEXTS)
    with torch.no_grad():
        ours = module(input_ids, mask, token_types)
        ref = _reference_with_past(
            backbone, module, input_ids, mask, token_types, _real_position_ids(backbone, input_ids)
        )
        plain = backbone.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(ours[real], ref[real], atol=1e-5), (ours[real] - ref[real]).abs().max()
    # The prefix really changes the representation.
    assert (ours[real] - plain[real]).abs().max() > 1e-2


def test_prefix_does_not_shift_positions(tiny_backbone):
    """HF PEFT (and the P-Tuning v2 code) let the prefix shift BERT's position
    ids by P; ours keeps the positions of a prefix-free run."""
    backbone = load_backbone(tiny_backbone)
    P = 5
    module = Adapter(backbone, "prefix", num_virtual_tokens=P)
    _randomise(module)
    module.eval()
    input_ids, mask, token_types = _encode(backbone, TEXTS)
    positions = _real_position_ids(backbone, input_ids)
    with torch.no_grad():
        ours = module(input_ids, mask, token_types)
        kept = _reference_with_past(backbone, module, input_ids, mask, token_types, positions)
        shifted = _reference_with_past(backbone, module, input_ids, mask, token_types, positions + P)
    real = mask.bool()
    assert torch.allclose(ours[real], kept[real], atol=1e-5), (ours[real] - kept[real]).abs().max()
    # The reference can tell the two apart: positions matter in this backbone.
    assert (ours[real] - shifted[real]).abs().max() > 1e-3


def test_prefix_keeps_full_sequence_length(tiny_bert):
    """A sequence of max_length wordpieces fits with any prefix length."""
    backbone = load_backbone(tiny_bert)
    n = backbone.max_length
    assert n == 64
    module = Adapter(backbone, "prefix", num_virtual_tokens=32)
    assert module.max_length == n
    input_ids = torch.randint(5, 50, (1, n))
    mask = torch.ones(1, n, dtype=torch.long)
    with torch.no_grad():
        out = module(input_ids, mask)
    assert out.shape == (1, n, backbone.hidden_width)
    assert torch.isfinite(out).all()
    prompt_module = Adapter(backbone, "prompt", num_virtual_tokens=8)
    assert prompt_module.max_length == n - 8


@pytest.mark.parametrize("method", ["prefix", "prompt_encoder", "prompt"])
def test_output_drops_virtual_positions(tiny_bert, method):
    backbone = load_backbone(tiny_bert)
    module = Adapter(backbone, method, num_virtual_tokens=7)
    input_ids, mask, token_types = _encode(backbone, TEXTS)
    with torch.no_grad():
        out = module(input_ids, mask, token_types)
    assert out.shape == (*input_ids.shape, backbone.hidden_width)


@pytest.mark.parametrize("method", ["prefix", "prompt_encoder", "prompt"])
def test_vectors_do_not_depend_on_batch_padding(any_tiny_backbone, method):
    import spacy

    nlp = spacy.blank("en")
    model = ptuning_transformer_v1(backbone=any_tiny_backbone, method=method, num_virtual_tokens=6)
    model.initialize()
    from spacy_ptuning import get_adapter

    _randomise(get_adapter(model), seed=3)
    short = nlp("alice met bob")
    longer = [nlp("the film was good and the plot was great , said carol in paris " * 2), nlp("a bank")]
    alone = model.predict([short])[0]
    batched = model.predict([short] + longer)[0]
    assert alone.shape == (3, 32)
    numpy.testing.assert_allclose(alone, batched, atol=1e-5)


def test_length_groups():
    from spacy_ptuning.model.encode import length_groups

    groups = length_groups([30, 3, 4, 31, 10, 0], max_tokens=64)
    assert [i for g in groups for i in g] == [5, 1, 2, 4, 0, 3]  # shortest first
    for g in groups:  # within budget (or a single sequence), similar lengths
        lens = [max(1, [30, 3, 4, 31, 10, 0][i]) for i in g]
        assert len(g) == 1 or len(g) * max(lens) <= 64
        assert max(lens) <= 1.5 * min(lens)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_length_grouping_changes_nothing_but_padding(tiny_bert, method):
    backbone = load_backbone(tiny_bert)
    texts = ["a", "alice met bob in paris today and then visited london", "the film", "good"]
    input_ids, mask, token_types = _encode(backbone, texts)
    grouped = Adapter(backbone, method, num_virtual_tokens=3, max_batch_tokens=8)
    _randomise(grouped)
    grouped.max_batch_tokens = 0
    one = grouped(input_ids, mask, token_types)  # one padded batch
    grouped.max_batch_tokens, grouped.tokens_sent, grouped.tokens_real = 8, 0, 0
    many = grouped(input_ids, mask, token_types)
    real = mask.bool()
    assert torch.allclose(one[real], many[real], atol=1e-5)
    assert (many[~real] == 0).all()
    assert grouped.tokens_sent < input_ids.numel()
    assert grouped.tokens_real == int(mask.sum())
    # Gradients reach the prompts through the regrouping.
    many[real].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in grouped.parameters())


@pytest.mark.parametrize("method", ["prompt", "prompt_encoder"])
def test_input_prompts_equal_the_backbone_run_on_extra_tokens(any_tiny_backbone, method):
    """Input prompts behave exactly as P extra vocabulary tokens placed before
    the text, with token type 0: the reference is a separate copy of the
    backbone whose vocabulary gets P new rows holding the prompt vectors,
    run on ordinary input ids (HF's own embedding, position and mask code;
    no inputs_embeds). The real tokens' outputs must match, in their order."""
    from transformers import AutoModel

    backbone = load_backbone(any_tiny_backbone)
    P = 4
    module = Adapter(backbone, method, num_virtual_tokens=P, max_batch_tokens=0)
    _randomise(module)
    module.eval()
    texts = TEXTS + ["a"]  # different lengths: padding on the right
    input_ids, mask, token_types = _encode(backbone, texts)
    B = input_ids.shape[0]
    with torch.no_grad():
        ours = module(input_ids, mask, token_types)
        virtual = module.prompt_row()  # (P, embed_width)
        reference = AutoModel.from_pretrained(any_tiny_backbone, **dict(backbone.family.load_kwargs)).eval()
        vocab = reference.get_input_embeddings().weight.shape[0]
        reference.resize_token_embeddings(vocab + P)
        reference.get_input_embeddings().weight[vocab:] = virtual
        ids = torch.cat([torch.arange(vocab, vocab + P).expand(B, P), input_ids], dim=1)
        full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
        kwargs = {}
        if token_types is not None and backbone.takes_token_types:
            kwargs["token_type_ids"] = torch.cat([torch.zeros(B, P, dtype=token_types.dtype), token_types], dim=1)
        expected = reference(input_ids=ids, attention_mask=full_mask, **kwargs).last_hidden_state[:, P:]
        alone = reference(input_ids=input_ids, attention_mask=mask, **({"token_type_ids": token_types} if kwargs else {})).last_hidden_state
    real = mask.bool()
    assert ours.shape == (*input_ids.shape, backbone.hidden_width)
    assert torch.allclose(ours[real], expected[real], atol=1e-5), (ours[real] - expected[real]).abs().max()
    # The prompts really take part (the reference is not trivially the plain run).
    assert (expected[real] - alone[real]).abs().max() > 1e-2


def test_injection_guard_turns_a_wrong_projection_count_into_an_error(tiny_bert):
    """The call-count guard: a forward that runs each layer's key and value
    projection once passes; one that skips some or all of them (as a
    transformers version computing attention another way would) is an
    error, not silently unprefixed output."""
    from spacy_ptuning.model.injection import injected_prefix

    backbone = load_backbone(tiny_bert, dtype="float32")
    ids, mask, types = _encode(backbone, TEXTS[:1])
    prefix = [(torch.zeros(1, 2, backbone.kv_width), torch.zeros(1, 2, backbone.kv_width))] * backbone.num_layers
    full_mask = torch.cat([torch.ones(1, 2, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        with injected_prefix(backbone, prefix):
            backbone.model(input_ids=ids, attention_mask=full_mask, token_type_ids=types)
        with pytest.raises(RuntimeError, match=r"ran \[0, 0\] key/value projections for 2 layers"):
            with injected_prefix(backbone, prefix):
                pass
        # Only the first layer's key projection ran (the others bypassed).
        hidden = backbone.model.embeddings(input_ids=ids, token_type_ids=types)
        with pytest.raises(RuntimeError, match=r"ran \[1, 0\] key/value projections"):
            with injected_prefix(backbone, prefix):
                backbone.model.encoder.layer[0].attention.self.key(hidden)
