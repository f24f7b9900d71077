#!/usr/bin/env bash
# GPU check (see bench/gpu_check.py), for the `device` tool's GPU machines.
# Prepare here first: bash bench/prepare_gpu_carry.sh. Then two calls on one
# warm machine (the carry limit is 64 MiB a call):
#   run(command="bash bench/gpu_check.sh deps", carry=[".whl"])
#   run(command="bash bench/gpu_check.sh check", carry=[".gpu"], timeout_s=480)
#   run(command="bash bench/gpu_check.sh serve", carry=[".gpu"], timeout_s=480)
#     (multi-task serving: bench/gpu_serve_check.py, instead of or after check)
# On a machine that already has the project installed: bash bench/gpu_check.sh local
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/ptuning-site
install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"
}
setup() {
  install .gpu/wheels/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # Register the package's entry points without installing it.
  mkdir -p "$SITE/spacy_ptuning-0.0.dist-info"
  cat > "$SITE/spacy_ptuning-0.0.dist-info/METADATA" <<'META'
Metadata-Version: 2.1
Name: spacy-ptuning
Version: 0.0
META
  python3 - "$SITE/spacy_ptuning-0.0.dist-info/entry_points.txt" <<'PY'
import sys, tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]
with open(sys.argv[1], "w") as f:
    for group, items in eps.items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n")
PY
}
case "${1:-local}" in
  deps)
    install .whl/*.whl
    echo "stage 1 installed into $SITE" ;;
  check|serve)
    setup
    if [ "$1" = check ]; then
      PYTHONUNBUFFERED=1 timeout 450 python3 bench/gpu_check.py --backbone .gpu/minilm --steps 300
    else
      PYTHONUNBUFFERED=1 timeout 450 python3 bench/gpu_serve_check.py --backbone .gpu/minilm
    fi ;;
  local)
    python bench/gpu_check.py --steps 300 ;;
  *) echo "usage: gpu_check.sh deps|check|serve|local" >&2; exit 2 ;;
esac
