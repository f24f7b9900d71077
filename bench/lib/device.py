"""The device a GPU check runs on (any CUDA machine, or the CPU for a smoke test)."""
import sys

import torch
from thinc.api import require_cpu, require_gpu, set_gpu_allocator


def use_device(device: str) -> None:
    """thinc and torch on the GPU (torch's allocator for both), or the CPU."""
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("No CUDA device: run with --device cpu for a smoke test.")
        set_gpu_allocator("pytorch")
        require_gpu(0)
    else:
        require_cpu()
