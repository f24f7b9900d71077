"""Tiny randomly initialised backbones, built in the test session (no downloads)."""
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "the a an of in on at to and or is was were be by for with from as that this it "
    "he she they we you i said says met visited lives works city company bank river "
    "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent "
    "paris london berlin rome madrid tokyo lima oslo cairo delhi acme globex initech "
    "umbrella hooli vandelay good bad great awful love hate fine poor nice terrible "
    "movie film plot story actor scene today yesterday very not really quite"
).split()


TINY_EXTRA = {
    # DeBERTa-v3 style: relative attention only (no absolute positions), c2p + p2c,
    # log-bucketed positions, shared key projection for relative embeddings.
    "deberta-v2": {
        "relative_attention": True,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
        "position_buckets": 16,
        "max_relative_positions": -1,
        "share_att_key": True,
        "norm_rel_ebd": "layer_norm",
        "type_vocab_size": 0,
        "pad_token_id": 0,
    },
    "electra": {"embedding_size": 24},
    "albert": {"embedding_size": 16, "num_hidden_groups": 1, "hidden_act": "gelu"},
    "distilbert": {},
    "mpnet": {"pad_token_id": 1},
}


def _write_bert(path: Path, max_positions: int = 64, model_type: str = "bert") -> Path:
    """A model with a WordPiece tokenizer made here: bert, electra, albert,
    distilbert or mpnet (MPNet's embeddings hard-code padding index 1)."""
    from transformers import AutoConfig, AutoModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if model_type == "mpnet":
        specials = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
    vocab = specials + sorted(set(WORDS))
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-$" if c not in vocab]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    tok.model_max_length = max_positions
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    if model_type == "distilbert":
        sizes = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(vocab),
        max_position_embeddings=max_positions,
        **sizes,
        **({"type_vocab_size": 2} if model_type in ("bert", "electra", "albert") else {}),
        **TINY_EXTRA.get(model_type, {}),
    )
    AutoModel.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _write_roberta(path: Path, model_type: str = "roberta") -> Path:
    """A RoBERTa-family model (roberta, xlm-roberta, camembert) with a small
    byte-level BPE tokenizer trained here."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModel, RobertaTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(WORDS)] * 4,
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    bpe.save_model(str(path))
    tok = RobertaTokenizerFast(
        vocab_file=str(path / "vocab.json"), merges_file=str(path / "merges.txt")
    )
    tok.model_max_length = 62
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(json.loads((path / "vocab.json").read_text())),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    AutoModel.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(_write_bert(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> str:
    return str(_write_roberta(tmp_path_factory.mktemp("tiny-roberta")))


@pytest.fixture(scope="session")
def other_tiny_bert(tmp_path_factory) -> str:
    """Same architecture as tiny_bert, different weights."""
    path = _write_bert(tmp_path_factory.mktemp("other-bert"))
    from transformers import BertModel

    model = BertModel.from_pretrained(path)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(1.5)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_electra(tmp_path_factory) -> str:
    return str(_write_bert(tmp_path_factory.mktemp("tiny-electra"), model_type="electra"))


@pytest.fixture(scope="session")
def tiny_albert(tmp_path_factory) -> str:
    return str(_write_bert(tmp_path_factory.mktemp("tiny-albert"), model_type="albert"))


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory) -> str:
    return str(_write_bert(tmp_path_factory.mktemp("tiny-distilbert"), model_type="distilbert"))


@pytest.fixture(scope="session")
def tiny_mpnet(tmp_path_factory) -> str:
    return str(_write_bert(tmp_path_factory.mktemp("tiny-mpnet"), model_type="mpnet"))


@pytest.fixture(scope="session")
def tiny_deberta_v2(tmp_path_factory) -> str:
    return str(_write_bert(tmp_path_factory.mktemp("tiny-deberta-v2"), model_type="deberta-v2"))


@pytest.fixture(scope="session")
def tiny_xlm_roberta(tmp_path_factory) -> str:
    return str(_write_roberta(tmp_path_factory.mktemp("tiny-xlmr"), "xlm-roberta"))


@pytest.fixture(scope="session")
def tiny_camembert(tmp_path_factory) -> str:
    return str(_write_roberta(tmp_path_factory.mktemp("tiny-camembert"), "camembert"))


@pytest.fixture(params=["tiny_bert", "tiny_roberta"])
def tiny_backbone(request) -> str:
    return request.getfixturevalue(request.param)


# Families whose HF code still has the legacy past_key_values path (the
# reference for prefix equivalence); the others are checked against a reference
# attention written in tests/test_architectures.py.
PAST_KV_TINY = ["tiny_bert", "tiny_roberta", "tiny_electra", "tiny_xlm_roberta", "tiny_camembert"]
ALL_TINY = PAST_KV_TINY + ["tiny_albert", "tiny_distilbert", "tiny_mpnet", "tiny_deberta_v2"]


@pytest.fixture(params=PAST_KV_TINY)
def past_kv_backbone(request) -> str:
    return request.getfixturevalue(request.param)



@pytest.fixture(params=ALL_TINY)
def any_tiny_backbone(request) -> str:
    """Every architecture family spacy-ptuning supports."""
    return request.getfixturevalue(request.param)
