#!/usr/bin/env bash
# torch threads of the server (--threads) with and without other load on the
# machine, measured with an external client (hey), one server at a time on
# 127.0.0.1, each run bounded by time (-z).
#
#   bash bench/serve_threads.sh [ADAPTERS_DIR]
#
# ADAPTERS_DIR defaults to the adapters bench/serve_hardening.py builds
# (MiniLM NER, 64 prefix tokens; it uses ner0). Rows: --threads 1 / 2 with
# OpenMP's default (spinning) wait policy, and 2 with OMP_WAIT_POLICY=PASSIVE;
# requests of 1 and of 8 sentences; with 0 and 2 busy-looping processes
# beside the server. Needs hey (Debian package).
set -euo pipefail
cd "$(dirname "$0")/.."
F=${1:-bench/results/hardening_adapters}
PORT=${PORT:-8111}
S1='"EU rejects German call to boycott British lamb ."'
S2='"The European Commission said on Thursday it disagreed with German advice to consumers ."'
body1="{\"texts\":[$S1]}"
body8="{\"texts\":[$S1,$S2,$S1,$S2,$S1,$S2,$S1,$S2]}"
echo "| --threads | OMP_WAIT_POLICY | busy loops beside | texts a request | docs/s |"
echo "| ---: | --- | ---: | ---: | ---: |"
for hogs in 0 2; do
  for cfg in "1 ACTIVE" "2 ACTIVE" "2 PASSIVE"; do
    set -- $cfg
    for n in 1 8; do
      pids=()
      for _ in $(seq 1 $hogs); do python -c "while True: pass" & pids+=($!); done
      OMP_WAIT_POLICY=$2 python -m spacy ptuning serve "$F" --port $PORT --log-level warning \
        --preload all --max-loaded 4 --threads $1 > /dev/null 2>&1 & srv=$!
      for _ in $(seq 1 300); do curl -sf localhost:$PORT/ready > /dev/null && break; sleep 0.2; done
      body=$body1; [ $n = 8 ] && body=$body8
      hey -z 2s -c 8 -m POST -T application/json -d "$body" http://127.0.0.1:$PORT/adapters/ner0/process > /dev/null
      rps=$(hey -z 8s -c 8 -m POST -T application/json -d "$body" http://127.0.0.1:$PORT/adapters/ner0/process | awk '/Requests\/sec/ {print $2}')
      echo "| $1 | $2 | $hogs | $n | $(python -c "print(round($rps * $n, 1))") |"
      kill $srv; wait $srv 2>/dev/null || true
      [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}"
    done
  done
done
