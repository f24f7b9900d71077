#!/usr/bin/env python
"""The server's hardening faults under load, before and after, in one run.

Runs the same four scenarios against two versions of the package: the
working tree ("after") and a git ref ("before", default ``dafce91``, the
last commit before the hardening issue), each version's own
``python -m spacy ptuning serve`` in a child process on 127.0.0.1, one at a
time, every scenario bounded in seconds and requests:

  long-text   one client sends one ~990 KB text (200k words, within the old
              --max-chars) while 4 clients send one CoNLL-like sentence per
              request to the other adapters: the small requests' latency
              and errors, the long request's status and time
  broken      8 clients hammer a corrupt adapter while 4 clients use the
              good ones: the good adapters' docs/s and the load attempts
  overload    open-loop arrivals (requests of 8 sentences) at 2.3x the
              texts/s the "before" server sustains with such requests
              (measured first, closed loop): accepted requests' p50/p99, 503s and how long a 503 took
  threads     --preload all vs lazy loading, with --hogs (2) busy-looping
              processes beside the server ("other load on the machine"):
              docs/s; and, after, --threads 0 (torch's default threads)

The adapters are MiniLM NER adapters of 64 prefix tokens, initialised, not
trained (throughput does not depend on the prompt values), plus one whose
adapter file is cut in half. Prints one table; writes
bench/results/serve_hardening.json.

    python bench/serve_hardening.py [--before dafce91] [--seconds 15]
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lib import serving

ROOT = Path(__file__).resolve().parent.parent
PER_REQUEST = 8  # sentences per request in the overload scenario
SENTENCES = [
    "EU rejects German call to boycott British lamb .",
    "Peter Blackburn",
    "The European Commission said on Thursday it disagreed with German advice to consumers .",
    "Germany 's representative to the European Union 's veterinary committee Werner Zwingmann said on Wednesday .",
]


def build_adapters(folder: Path, n: int) -> None:
    if (folder / f"ner{n - 1}").exists() and (folder / "broken").exists():
        return
    import spacy
    from spacy.training import Example

    nlp = spacy.blank("en")
    nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": {"method": "prefix", "num_virtual_tokens": 64}}})
    egs = [Example.from_dict(nlp.make_doc("Alice visited Paris"), {"entities": [(0, 5, "PER"), (14, 19, "LOC")]})]
    nlp.initialize(lambda: egs)
    for i in range(n):
        nlp.to_disk(folder / f"ner{i}")
    nlp.to_disk(folder / "broken")
    model = folder / "broken" / "ptuning_ner" / "model"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])


class Server(serving.Server):
    """A server of the source tree ``src`` (before/after) reloading every second."""

    def __init__(self, src: Path, folder: Path, extra=()):
        super().__init__(folder, ["--check-interval", "1", *extra], src=src)

    def metric(self, name: str) -> float:
        return serving.metric(self.metrics(), name)


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def closed_loop(url, adapters, clients, seconds, max_requests, timeout=60, texts_per_request=1):
    """`clients` loops, `texts_per_request` sentences per request (one by
    default), to adapters drawn at random; docs/s counts texts."""
    lat, status = [], {}
    end = time.monotonic() + seconds
    sent = [0]
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=clients + 4)) as c:
        async def one(k):
            rng = random.Random(k)
            while time.monotonic() < end and sent[0] < max_requests:
                sent[0] += 1
                t0 = time.monotonic()
                try:
                    r = await c.post(f"/adapters/{rng.choice(adapters)}/process",
                                     json={"texts": [rng.choice(SENTENCES)] * texts_per_request})
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                lat.append((time.monotonic() - t0, code))
                status[code] = status.get(code, 0) + 1
        await asyncio.gather(*(one(k) for k in range(clients)))
    ok = [t for t, code in lat if code == 200]
    return {"docs_s": texts_per_request * len(ok) / seconds, "p50": pct(ok, 0.5), "p95": pct(ok, 0.95),
            "max": max(ok, default=float("nan")), "status": status}


async def long_text(url, adapters, seconds):
    huge = " ".join(["word"] * 198_000)  # ~990 KB
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        t0 = time.monotonic()
        answered = []

        async def send():
            r = await c.post(f"/adapters/{adapters[0]}/process", json={"texts": [huge]})
            answered.append((r.status_code, time.monotonic() - t0))

        task = asyncio.create_task(send())
        await asyncio.sleep(0.5)
        small = await closed_loop(url, adapters[1:], 4, seconds, 5000)
        await task
        return {"long_status": answered[0][0], "long_s": answered[0][1], **small}


async def broken(url, adapters, seconds):
    async def hammer():
        end = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def one():
                while time.monotonic() < end:
                    await c.post("/adapters/broken/process", json={"texts": ["alice"]})
            await asyncio.gather(*(one() for _ in range(8)))

    _, good = await asyncio.gather(hammer(), closed_loop(url, adapters, 4, seconds, 5000))
    return good


async def open_loop(url, adapters, rate, seconds, max_requests, texts_per_request=PER_REQUEST):
    """Poisson arrivals at `rate` requests/s of `texts_per_request` sentences
    each (so that one Python client can offer more than the server takes)."""
    rng = random.Random(0)
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=2000)) as c:
        async def one(adapter, text):
            t0 = time.monotonic()
            try:
                r = await c.post(f"/adapters/{adapter}/process", json={"texts": [text] * texts_per_request})
                code = r.status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            results.append((code, time.monotonic() - t0))

        tasks = []
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(tasks) < max_requests:
            tasks.append(asyncio.create_task(one(rng.choice(adapters), rng.choice(SENTENCES))))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    ok = [t for code, t in results if code == 200]
    busy = [t for code, t in results if code == 503]
    status = {}
    for code, _ in results:
        status[code] = status.get(code, 0) + 1
    return {"sent": len(results), "docs_s": texts_per_request * len(ok) / seconds, "p50": pct(ok, 0.5), "p99": pct(ok, 0.99),
            "n503": len(busy), "p99_503": pct(busy, 0.99), "status": status}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="dafce91", help="git ref of the 'before' version")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--hogs", type=int, default=2, help="busy-looping processes beside the server in the threads scenario")
    ap.add_argument("--only", nargs="*", default=["capacity", "long-text", "broken", "overload", "threads"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.out / "hardening_adapters"
    folder.mkdir(exist_ok=True)
    build_adapters(folder, args.adapters)
    good = [f"ner{i}" for i in range(args.adapters)]
    tmp = Path(tempfile.mkdtemp(prefix="before-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tmp / "src"), args.before], check=True)
    versions = {"before": tmp / "src", "after": ROOT}
    rows = {}
    try:
        for version, src in versions.items():
            print(f"== {version} ({src})", flush=True)
            row = rows[version] = {}
            preload = ["--preload", ",".join(good)]

            def run(extra, fn):
                server = Server(src, folder, extra)
                try:
                    server.wait_ready()
                    asyncio.run(closed_loop(server.url, good, 8, 3, 500))  # warm
                    return fn(server)
                finally:
                    server.stop()

            if "capacity" in args.only or "long-text" in args.only:
                row["capacity"] = run(preload, lambda s: asyncio.run(closed_loop(s.url, good, 8, args.seconds, 20000)))
            if "long-text" in args.only:
                row["long-text"] = run(preload, lambda s: asyncio.run(long_text(s.url, good, args.seconds)))
            if "broken" in args.only:
                def hammered(s):
                    out = asyncio.run(broken(s.url, good, args.seconds))
                    out["load_attempts"] = s.metric("ptuning_adapter_load_failures_total")
                    return out

                row["broken"] = run(preload, hammered)
            if "overload" in args.only:
                def overloaded(s):
                    row["capacity-8"] = asyncio.run(closed_loop(s.url, good, 8, args.seconds, 20000, texts_per_request=PER_REQUEST))
                    rate = 2.3 * rows["before"]["capacity-8"]["docs_s"] / PER_REQUEST  # requests/s, the same for both
                    out = asyncio.run(open_loop(s.url, good, rate, args.seconds, int(rate * args.seconds) + 10))
                    out["offered"] = rate
                    return out

                row["overload"] = run(preload, overloaded)
            if "threads" in args.only:
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
                try:
                    modes = [("preload all", ["--preload", "all", "--max-loaded", str(args.adapters)]), ("lazy", [])]
                    if version == "after":
                        modes.append(("preload all, --threads 0", modes[0][1] + ["--threads", "0"]))
                    for mode, extra in modes:
                        row[f"threads: {mode}"] = run(extra, lambda s: asyncio.run(closed_loop(s.url, good, 8, args.seconds, 20000)))
                finally:
                    for hog in hogs:
                        hog.kill()
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "src")], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    (args.out / "serve_hardening.json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"\nload average at the end: {os.getloadavg()}")
    print("| scenario | measure | before | after |\n| --- | --- | ---: | ---: |")

    def line(scenario, measure, get):
        vals = []
        for v in ("before", "after"):
            try:
                vals.append(get(rows[v][scenario]))
            except (KeyError, TypeError):
                vals.append("-")
        print(f"| {scenario} | {measure} | {vals[0]} | {vals[1]} |")

    f1, ms = (lambda x: f"{x:.1f}"), (lambda x: f"{x * 1000:.0f} ms")
    line("capacity", "docs/s (8 clients, closed loop)", lambda r: f1(r["docs_s"]))
    line("long-text", "long request: status, seconds", lambda r: f"{r['long_status']}, {r['long_s']:.1f} s")
    line("long-text", "small requests meanwhile: docs/s", lambda r: f1(r["docs_s"]))
    line("long-text", "small requests: p95 / max", lambda r: f"{ms(r['p95'])} / {ms(r['max'])}")
    line("long-text", "small requests: statuses", lambda r: r["status"])
    line("broken", "good adapters: docs/s", lambda r: f1(r["docs_s"]))
    line("broken", "load attempts of the broken adapter", lambda r: int(r["load_attempts"]))
    line("capacity-8", f"docs/s ({PER_REQUEST} sentences a request, 8 clients)", lambda r: f1(r["docs_s"]))
    line("overload", f"offered texts/s (2.3x before's capacity; {PER_REQUEST} a request)", lambda r: f1(r["offered"] * PER_REQUEST))
    line("overload", "answered docs/s", lambda r: f1(r["docs_s"]))
    line("overload", "accepted: p50 / p99", lambda r: f"{ms(r['p50'])} / {ms(r['p99'])}")
    line("overload", "503s; p99 time to a 503", lambda r: f"{r['n503']}; {ms(r['p99_503'])}")
    line("overload", "statuses", lambda r: r["status"])
    line("threads: preload all", "docs/s beside busy loops", lambda r: f1(r["docs_s"]))
    line("threads: lazy", "docs/s beside busy loops", lambda r: f1(r["docs_s"]))
    line("threads: preload all, --threads 0", "docs/s beside a busy loop (torch's default threads)", lambda r: f1(r["docs_s"]))


if __name__ == "__main__":
    main()
