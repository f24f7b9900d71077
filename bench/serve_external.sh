#!/usr/bin/env bash
# The server as docs/serving.md starts it (--preload all), loaded by clients
# nobody here wrote: wrk (closed loop, 2 threads, 8 connections) and hey
# (8 workers; then a burst of 2,000 requests over 1,000 connections). One
# server on 127.0.0.1; every run is bounded by time (-d/-z) or requests (-n).
#
#   bash bench/serve_external.sh [ADAPTERS_DIR] [SECONDS]
#
# ADAPTERS_DIR defaults to bench/results/hardening_adapters (built by
# bench/serve_hardening.py: MiniLM NER adapters of 64 prefix tokens).
# Needs wrk and hey (Debian packages).
set -euo pipefail
cd "$(dirname "$0")/.."
F=${1:-bench/results/hardening_adapters}
T=${2:-15}
PORT=${PORT:-8112}
URL=http://127.0.0.1:$PORT/adapters/ner0/process
BODY='{"texts": ["EU rejects German call to boycott British lamb ."]}'
python -m spacy ptuning serve "$F" --port $PORT --log-level warning --preload all --max-loaded 8 > /dev/null 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf localhost:$PORT/ready > /dev/null && break; sleep 0.2; done
hey -z 3s -c 8 -m POST -T application/json -d "$BODY" $URL > /dev/null   # warm-up
echo "== wrk -t2 -c8 -d${T}s (load average $(cut -d' ' -f1-3 /proc/loadavg))"
wrk -t2 -c8 -d${T}s --latency -s bench/wrk_post.lua $URL | grep -E "Requests/sec|Latency|50%|90%|99%|requests in|Non-2xx|Socket errors"
echo "== hey -z ${T}s -c 8"
hey -z ${T}s -c 8 -m POST -T application/json -d "$BODY" $URL | grep -E "Requests/sec|50% in|95% in|99% in|\[[0-9]{3}\][[:space:]]+[0-9]+ responses"
echo "== hey -n 2000 -c 1000 (a burst)"
hey -n 2000 -c 1000 -t 60 -m POST -T application/json -d "$BODY" $URL | grep -E "Requests/sec|Slowest|50% in|99% in|\[[0-9]{3}\][[:space:]]+[0-9]+ responses|Error"
curl -s localhost:$PORT/ready > /dev/null && echo "== the server answers /ready after the burst"
