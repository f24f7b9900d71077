"""A backbone's identity: what a saved adapter records about the backbone it
was trained on, and how a load checks it."""
import hashlib

import torch


def compute_fingerprint(model: torch.nn.Module) -> dict:
    cfg = model.config
    arch = {
        key: getattr(cfg, key, None)
        for key in (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
            "max_position_embeddings",
        )
    }
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            flat = tensor.reshape(-1)
            step = max(1, flat.numel() // 512)
            sample = flat[::step][:512].to(torch.bfloat16).float().cpu().numpy()
            digest.update(name.encode("utf8"))
            digest.update(repr(tuple(tensor.shape)).encode("utf8"))
            digest.update(sample.tobytes())
    return {"architecture": arch, "weights_sha256": digest.hexdigest()[:20]}


def describe_fingerprint(fp: dict) -> str:
    arch = fp.get("architecture", {})
    return (
        f"{arch.get('model_type')} (hidden {arch.get('hidden_size')}, "
        f"{arch.get('num_hidden_layers')} layers, vocab {arch.get('vocab_size')}, "
        f"weights {fp.get('weights_sha256')})"
    )
