"""Every supported architecture: prefix maths against a reference attention
computation written here, frozen weights, learning, save/load round trip."""
import math

import pytest
import spacy
import torch
from spacy.training import Example
from spacy.util import fix_random_seed
from thinc.api import Adam

from spacy_ptuning import Adapter, get_adapter, load_backbone

TEXTS = ["alice met bob in paris today", "the film", "good movie , really great plot"]


def _attend(q, k, v, mask, heads, bias=None):
    """Plain multi-head attention; mask (B, Lk) of 1/0, bias (B, H, Lq, Lk)."""
    B, Lq, W = q.shape
    d = W // heads

    def split(t):
        return t.view(B, -1, heads, d).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    context = scores.softmax(-1) @ split(v)
    return context.transpose(1, 2).reshape(B, Lq, W)


def _reference(backbone, prefix, input_ids, mask):
    """The backbone's forward written out, with prefix keys/values prepended."""
    model, cfg = backbone.model, backbone.config
    P = prefix[0][0].shape[1]
    full_mask = torch.cat([torch.ones(mask.shape[0], P, dtype=mask.dtype), mask], dim=1)
    heads = cfg.num_attention_heads if cfg.model_type != "distilbert" else cfg.n_heads

    def kv(layer, k, v):
        return torch.cat([prefix[layer][0], k], 1), torch.cat([prefix[layer][1], v], 1)

    if cfg.model_type == "distilbert":
        x = model.embeddings(input_ids)
        for i, block in enumerate(model.transformer.layer):
            a = block.attention
            k, v = kv(i, a.k_lin(x), a.v_lin(x))
            sa = block.sa_layer_norm(a.out_lin(_attend(a.q_lin(x), k, v, full_mask, heads)) + x)
            x = block.output_layer_norm(block.ffn(sa) + sa)
        return x
    if cfg.model_type == "albert":
        x = model.encoder.embedding_hidden_mapping_in(model.embeddings(input_ids))
        block = model.encoder.albert_layer_groups[0].albert_layers[0]
        for i in range(cfg.num_hidden_layers):
            a = block.attention
            k, v = kv(i, a.key(x), a.value(x))
            x1 = a.LayerNorm(x + a.dense(_attend(a.query(x), k, v, full_mask, heads)))
            ffn = block.ffn_output(block.activation(block.ffn(x1)))
            x = block.full_layer_layer_norm(ffn + x1)
        return x
    if cfg.model_type == "mpnet":
        x = model.embeddings(input_ids)
        bias = model.encoder.compute_position_bias(x)
        bias = torch.cat([bias.new_zeros((*bias.shape[:-1], P)), bias], dim=-1)
        for i, block in enumerate(model.encoder.layer):
            a = block.attention.attn
            k, v = kv(i, a.k(x), a.v(x))
            x1 = block.attention.LayerNorm(a.o(_attend(a.q(x), k, v, full_mask, heads, bias)) + x)
            x = block.output(block.intermediate(x1), x1)
        return x
    if cfg.model_type == "deberta-v2":
        # HF's relative-position scores for the real keys; prefix keys get the
        # content score only (they have no position).
        x = model.embeddings(input_ids, mask=mask)
        rel_embeddings = model.encoder.get_rel_embedding()
        relative_pos = model.encoder.get_rel_pos(x)
        keep = (mask[:, None, :] * mask[:, :, None]).unsqueeze(1)
        keep = torch.cat([torch.ones(*keep.shape[:-1], P, dtype=keep.dtype), keep], dim=-1)
        for i, block in enumerate(model.encoder.layer):
            a = block.attention.self
            B, L, _ = x.shape
            k, v = kv(i, a.key_proj(x), a.value_proj(x))
            q_, k_, v_ = (a.transpose_for_scores(t, heads) for t in (a.query_proj(x), k, v))
            scale_factor = 1 + len(a.pos_att_type)
            scores = q_ @ k_.transpose(-1, -2) / math.sqrt(q_.shape[-1] * scale_factor)
            rel = a.disentangled_attention_bias(q_, k_[:, P:], relative_pos, rel_embeddings, scale_factor)
            scores = scores + torch.cat([torch.zeros(*rel.shape[:-1], P), rel], dim=-1)
            scores = scores.view(B, heads, L, P + L).masked_fill(~keep.bool(), torch.finfo(x.dtype).min)
            context = scores.softmax(-1).view(B * heads, L, P + L) @ v_
            context = context.view(B, heads, L, -1).permute(0, 2, 1, 3).reshape(B, L, -1)
            attention_output = block.attention.output(context, x)
            x = block.output(block.intermediate(attention_output), attention_output)
        return x
    raise NotImplementedError(cfg.model_type)


@pytest.mark.parametrize("name", ["tiny_distilbert", "tiny_albert", "tiny_mpnet", "tiny_deberta_v2"])
def test_prefix_equals_reference_attention(request, name):
    backbone = load_backbone(request.getfixturevalue(name))
    module = Adapter(backbone, "prefix", num_virtual_tokens=5)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        module.prompts.embedding.copy_(torch.randn(module.prompts.embedding.shape, generator=gen))
    module.eval()
    enc = backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = module(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        ref = _reference(backbone, module.prompt_values(len(TEXTS)), enc["input_ids"], enc["attention_mask"])
        plain = backbone.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert torch.allclose(ours[real], ref[real], atol=1e-5), (ours[real] - ref[real]).abs().max()
    assert (ours[real] - plain.last_hidden_state[real]).abs().max() > 1e-2


def _examples(nlp):
    data = [("a good film", "POS"), ("an awful plot", "NEG"), ("really great actor", "POS"),
            ("a terrible scene", "NEG"), ("nice story today", "POS"), ("poor movie yesterday", "NEG")]
    return [
        Example.from_dict(nlp.make_doc(t), {"cats": {"POS": float(l == "POS"), "NEG": float(l == "NEG")}})
        for t, l in data
    ]


@pytest.mark.parametrize("method", ["prefix", "prompt_encoder", "prompt"])
def test_every_architecture_trains_frozen_and_round_trips(any_tiny_backbone, method, tmp_path):
    """A few updates on every family: every prompt tensor moves, the backbone
    does not, and the saved pipeline predicts exactly what the trained one
    does. (That the prompts compute the right thing is the reference tests'
    job; that they learn, test_training's.)"""
    fix_random_seed(0)
    nlp = spacy.blank("en")
    tok2vec = {"@architectures": "spacy_ptuning.PTuningTransformer.v1", "backbone": any_tiny_backbone,
               "method": method, "num_virtual_tokens": 4}
    nlp.add_pipe("ptuning_textcat", config={"model": {"tok2vec": tok2vec}})
    examples = _examples(nlp)
    nlp.initialize(lambda: examples)
    module = get_adapter(nlp.get_pipe("ptuning_textcat").model)
    frozen = {k: v.clone() for k, v in module.backbone.model.state_dict().items()}
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = Adam(0.05)
    for _ in range(3):
        nlp.update(examples, sgd=optimizer)
    for k, v in module.state_dict().items():
        assert not torch.equal(v, initial[k]), f"prompt tensor {k} did not train"
    for k, v in module.backbone.model.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    nlp.to_disk(tmp_path / "pipe")
    loaded = spacy.load(tmp_path / "pipe")
    for a, b in zip(nlp.pipe(TEXTS), loaded.pipe(TEXTS)):
        assert a.cats == b.cats
