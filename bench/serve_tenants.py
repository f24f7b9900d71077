#!/usr/bin/env python
"""Retention as tenants grow: one server holding N resident adapters of mixed
kinds, against one-adapter servers, under the same traffic.

The adapters: the ten kinds of the load test (``lib.serving.ADAPTERS``: NER
and sentiment, prefix / prompt / prompt_encoder, 8-64 virtual tokens) built
once each, then copied N/10 times with their prompts perturbed (random, not
trained: throughput does not depend on the prompt values, NER decoding
aside; each copy is a distinct adapter to the server, with its own
checksum). Copies are made by rewriting the adapter's safetensors inside the
saved model (milliseconds each), not by training or re-saving pipelines.

For each N (``--tenants 1,10,100,1000``): a server with ``--max-loaded N
--preload all`` on 127.0.0.1; ``--clients`` closed-loop clients send one dev
sentence per request (CoNLL-2003 to NER adapters, SST-2 to sentiment ones)
to adapters drawn uniformly or Zipf(s=1.1) (``--traffic``), for
``--seconds`` or ``--max-requests``, whichever ends first, in each batching
mode (``--modes mixed,per_adapter``). Prints docs/s, p50/p95, errors, RSS
and RSS per resident adapter, and the retention: docs/s over the
baseline's docs/s for the same traffic. The baseline (``--baseline
kinds``, the default) is what the traffic would get from one-adapter
servers, one per kind, sharing the machine: each of the ten kinds served
alone (its own task's texts), combined by the traffic's share of each kind
(``matched_baseline``). A one-adapter server of a single kind is not the
baseline of mixed traffic: 64 prefix tokens, input prompts (which lengthen
every row) or a long SST-2 sentence cost more than a CoNLL sentence under
16 prefix tokens
(``--baseline first``: against the first ``--tenants`` row, the older
measure). Writes bench/results/serve_tenants_*.json/.md.

    python bench/serve_tenants.py [--tenants 1,10,100,1000] [--seconds 30] [--traffic uniform,zipf] [--plot bench/figures/serve_tenants.png]

``--variants 'freeze=;no-freeze=--gc-freeze-interval 0'``: each N served
once per variant (its extra server arguments), side by side in one table;
the one-adapter baselines use ``--server-args`` alone.

The copies go to bench/results/tenant_adapters/ (git-ignored; about 1.4 MB
an adapter) and are deleted at the end unless --keep.
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Dict, List

from lib import common
from lib.serving import ADAPTERS, Server, build_adapters, closed_loop, load_test_args, percentile, tenant_texts


def perturbed_copy(src: Path, dst: Path, seed: int) -> None:
    """A copy of the pipeline folder ``src`` whose adapter prompts are its
    own (``src``'s plus seeded noise), with the envelope's checksum redone."""
    import numpy
    import srsly
    from safetensors.numpy import load, save

    from spacy_ptuning.model.serialization import weights_checksum

    shutil.copytree(src, dst)
    rng = numpy.random.default_rng(seed)
    for model_file in dst.glob("*/model"):
        msg = srsly.msgpack_loads(model_file.read_bytes())
        changed = False
        for node_shims, i, env in adapter_envelopes(msg):
            tensors = {k: v + rng.normal(0, 0.02, v.shape).astype(v.dtype) for k, v in load(env["weights"]).items()}
            env["weights"] = save(tensors)
            env["weights_sha256"] = weights_checksum(env["weights"])
            node_shims[i] = srsly.msgpack_dumps(env)
            changed = True
        if changed:
            model_file.write_bytes(srsly.msgpack_dumps(msg))


def adapter_envelopes(msg: dict):
    """(the node's shims, index, envelope) of each spacy-ptuning adapter
    envelope in a saved thinc model's msgpack (``msg["shims"]``)."""
    import srsly

    for node_shims in msg["shims"]:
        for i, shim in enumerate(node_shims):
            try:
                env = srsly.msgpack_loads(shim)
            except Exception:
                continue
            if isinstance(env, dict) and str(env.get("format", "")).startswith("spacy-ptuning-adapter/"):
                yield node_shims, i, env


def make_tenants(base: Path, out: Path, n: int) -> Dict[str, str]:
    """n adapters in ``out`` (name -> task), cycling over the ten kinds."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for k in range(n):
        name, task, _, _ = ADAPTERS[k % len(ADAPTERS)]
        tenant = f"{name}-t{k:05d}"
        if not (out / tenant).exists():
            perturbed_copy(base / name, out / tenant, seed=k)
        tasks[tenant] = task
    return tasks


def traffic_weights(names: List[str], traffic: str) -> Dict[str, float]:
    """Each tenant's share of the requests: equal ("uniform"), or Zipf(s=1.1)
    over a fixed shuffle of the tenants (which ones are popular is not the
    kind order)."""
    order = sorted(names)
    random.Random(7).shuffle(order)
    if traffic == "zipf":
        return {name: 1.0 / (r + 1) ** 1.1 for r, name in enumerate(order)}
    return {name: 1.0 for name in order}


def measure(server: Server, tasks: Dict[str, str], texts: Dict[str, list], traffic: str, args) -> dict:
    """One bounded closed-loop run over the server's tenants."""
    weights = traffic_weights(list(tasks), traffic)
    order, shares = list(weights), list(weights.values())

    def work(rng):
        name = rng.choices(order, shares)[0]
        return name, rng.choice(texts[tasks[name]])

    asyncio.run(closed_loop(server.url, work, args.clients, 3, 200))  # warm
    gc_before = server.metrics()
    run = asyncio.run(closed_loop(server.url, work, args.clients, args.seconds, args.max_requests))
    gc_after = server.metrics()
    ok = len(run["latencies"])
    full = 'ptuning_gc_{}{{generation="2"}}'.format
    return {
        "ok": ok,
        "errors": {str(k): v for k, v in run["statuses"].items() if k != 200},
        "docs_per_s": ok / run["seconds"],
        "p50_ms": 1000 * percentile(run["latencies"], 50),
        "p95_ms": 1000 * percentile(run["latencies"], 95),
        "rss_mb": server.rss_mb(),
        # The server's full collections during the run (serving/gc_pauses.py).
        "gc2_collections": gc_after.get(full("collections_total"), 0) - gc_before.get(full("collections_total"), 0),
        "gc2_seconds": gc_after.get(full("seconds_total"), 0) - gc_before.get(full("seconds_total"), 0),
        "gc2_longest_s": gc_after.get(full("longest_seconds"), 0),
        "frozen_objects": gc_after.get("ptuning_gc_frozen_objects", 0),
        "latencies": run["latencies"],
    }


def kind_of(tenant: str) -> str:
    """The kind (``ADAPTERS`` name) of a tenant made by :func:`make_tenants`."""
    return tenant.rsplit("-t", 1)[0]


def one_per_kind(base: Path, folder: Path, texts, mode: str, args) -> Dict[str, dict]:
    """The baseline of heterogeneous traffic: each kind served alone, by a
    one-adapter server of its own (one run each, its own task's texts)."""
    results = {}
    for k, (name, task, _, _) in enumerate(ADAPTERS):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        tenant = f"{name}-t{k:05d}"
        perturbed_copy(base / name, folder / tenant, seed=k)  # tenant k of every N is this same adapter
        server = Server(folder, load_test_args(mode, 1, "all") + args.server_args.split())
        try:
            server.wait_ready(timeout=600)
            results[name] = measure(server, {tenant: task}, texts, "uniform", args)
        finally:
            server.stop()
        print(json.dumps({"kind": name, "mode": mode} | {k: v for k, v in results[name].items() if k != "latencies"}), flush=True)
    return results


def matched_baseline(alone: Dict[str, dict], tasks: Dict[str, str], traffic: str) -> Dict[str, float]:
    """What one-adapter servers of each kind, sharing the machine, would serve
    of this traffic: with s_k the share of kind k's requests and r_k its
    server's docs/s, 1 / sum(s_k / r_k) docs/s; p95 of the kinds' latencies,
    each weighted by its share."""
    shares: Dict[str, float] = {}
    for tenant, weight in traffic_weights(list(tasks), traffic).items():
        shares[kind_of(tenant)] = shares.get(kind_of(tenant), 0.0) + weight
    total = sum(shares.values())
    weighted = sorted((lat, shares[k] / total / len(alone[k]["latencies"])) for k in shares for lat in alone[k]["latencies"])
    if not weighted or any(not alone[k]["docs_per_s"] for k in shares):
        return {"docs_per_s": None, "p95_ms": None}  # a kind answered nothing alone: no baseline
    docs = 1.0 / sum(w / total / alone[k]["docs_per_s"] for k, w in shares.items())
    acc, p95 = 0.0, weighted[-1][0]
    for lat, w in weighted:
        acc += w
        if acc >= 0.95:
            p95 = lat
            break
    return {"docs_per_s": docs, "p95_ms": 1000 * p95}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--tenants", default="1,10,100,1000")
    p.add_argument("--traffic", default="uniform,zipf")
    p.add_argument("--modes", default="mixed,per_adapter")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--max-requests", type=int, default=10000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the adapter copies")
    p.add_argument("--server-args", default="")
    p.add_argument("--plot", type=Path, default=None,
                   help="write the retention and p95 curves over --tenants to this PNG (e.g. bench/figures/serve_tenants.png)")
    p.add_argument("--variants", default="",
                   help="serve each N once per variant, 'label=extra server args' separated by ';' "
                        "(e.g. 'freeze=;no-freeze=--gc-freeze-interval 0'); default: one, --server-args alone")
    p.add_argument("--baseline", choices=("kinds", "first"), default="kinds",
                   help="retention against one-adapter servers of each kind, share-matched to the traffic "
                        "(kinds), or against the first --tenants row alone (first)")
    args = p.parse_args()
    variants = [tuple(v.split("=", 1)) if "=" in v else (v, "") for v in args.variants.split(";") if v.strip()] or [("", "")]

    texts = tenant_texts(args.data_dir)
    base = build_adapters(args.out_dir / "serve_adapters", args.data_dir, False)["ptuning"]
    folder = args.out_dir / "tenant_adapters"
    counts = [int(n) for n in args.tenants.split(",")]
    rows: List[dict] = []
    alone: Dict[str, Dict[str, dict]] = {}
    started = time.time()
    load_start = os.getloadavg()
    try:
        if args.baseline == "kinds":
            for mode in args.modes.split(","):
                alone[mode] = one_per_kind(base, folder, texts, mode, args)
        for n in counts:
            t0 = time.perf_counter()
            shutil.rmtree(folder, ignore_errors=True)
            tasks = make_tenants(base, folder, n)
            made = time.perf_counter() - t0
            for mode, (variant, extra) in [(m, v) for m in args.modes.split(",") for v in variants]:
                server = Server(folder, load_test_args(mode, n, "all") + args.server_args.split() + extra.split())
                try:
                    t1 = time.perf_counter()
                    server.wait_ready(timeout=3600)
                    ready = time.perf_counter() - t1
                    for traffic in args.traffic.split(","):
                        rows.append(measure(server, tasks, texts, traffic, args) | {
                            "tenants": n, "mode": mode, "variant": variant, "traffic": traffic, "ready_s": ready, "made_s": made})
                        if alone:
                            rows[-1]["baseline"] = matched_baseline(alone[mode], tasks, traffic)
                        print(json.dumps({k: v for k, v in rows[-1].items() if k != "latencies"}), flush=True)
                finally:
                    server.stop()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        one = next((r for r in rows if r["tenants"] == counts[0] and r["mode"] == row["mode"] and r["traffic"] == row["traffic"]
                    and r["variant"] == row["variant"]), None)
        ref = row.get("baseline") or one
        row["retention"] = row["docs_per_s"] / ref["docs_per_s"] if ref and ref["docs_per_s"] else None
        row["p95_vs_one"] = row["p95_ms"] / ref["p95_ms"] if ref and ref["p95_ms"] else None
        row["rss_per_tenant_mb"] = (row["rss_mb"] - one["rss_mb"]) / max(1, row["tenants"] - counts[0]) if one and row["tenants"] > counts[0] else None
    f = lambda v, d=1: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
    lines = []
    if alone:
        lines += ["One-adapter servers, one per kind (the baseline):", "",
                  "| mode | kind | docs/s | p50 ms | p95 ms | errors |", "| --- | --- | ---: | ---: | ---: | --- |"]
        lines += [f"| {mode} | {kind} | {f(r['docs_per_s'])} | {f(r['p50_ms'])} | {f(r['p95_ms'])} | {r['errors'] or 0} |"
                  for mode, kinds in alone.items() for kind, r in kinds.items()]
        lines += ["", "Retention = docs/s / the baseline's docs/s for the same traffic (share-matched over the kinds).", ""]
    lines += ["| tenants | mode | variant | traffic | docs/s | baseline docs/s | retention | p50 ms | p95 ms | p95 / baseline | errors | RSS MB | MB per extra tenant | ready s | full GCs in the run: count, s | frozen objects |",
              "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ref = r.get("baseline") or next((o for o in rows if o["tenants"] == counts[0] and o["mode"] == r["mode"] and o["traffic"] == r["traffic"]
                                         and o["variant"] == r["variant"]), {})
        lines.append(f"| {r['tenants']:,} | {r['mode']} | {r['variant'] or '-'} | {r['traffic']} | {f(r['docs_per_s'])} | {f(ref.get('docs_per_s'))} | {f(r['retention'], 2)} | "
                     f"{f(r['p50_ms'])} | {f(r['p95_ms'])} | {f(r['p95_vs_one'], 2)} | {r['errors'] or 0} | {f(r['rss_mb'], 0)} | "
                     f"{f(r['rss_per_tenant_mb'], 2)} | {f(r['ready_s'])} | {r.get('gc2_collections', 0):.0f}, {r.get('gc2_seconds', 0):.2f} | "
                     f"{r.get('frozen_objects', 0):,.0f} |")
    info = common.machine_info()
    table = "\n".join(lines)
    footer = (f"\n\nMachine: {info}; load average at start {load_start}, at end {os.getloadavg()}; "
              f"{args.clients} clients, {args.seconds:g} s or {args.max_requests} requests a run; "
              f"total {(time.time() - started) / 60:.1f} min.")
    print(table + footer)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out_dir / f"serve_tenants_{stamp}"
    for row in rows:
        del row["latencies"]
    for kinds in alone.values():
        for r in kinds.values():
            r.pop("latencies", None)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "alone": alone, "args": vars(args) | {"data_dir": str(args.data_dir), "out_dir": str(args.out_dir), "plot": args.plot and str(args.plot)}}, indent=1))
    out.with_suffix(".md").write_text(table + footer + "\n")
    if args.plot:
        print(plot_curves(rows, args.plot, footer.strip()) or f"wrote {args.plot}")


def plot_curves(rows: List[dict], path: Path, caption: str) -> str:
    """Retention and p95 / baseline against the number of tenants (log
    scale), one line per mode, variant and traffic; '' when written, or why
    not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available: {e}"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    fig.subplots_adjust(bottom=0.2, top=0.88, wspace=0.3)
    series: Dict[tuple, List[dict]] = {}
    for r in rows:
        series.setdefault((r["mode"], r["variant"], r["traffic"]), []).append(r)
    for (mode, variant, traffic), rs in series.items():
        rs = sorted(rs, key=lambda r: r["tenants"])
        label = " ".join(x for x in (mode, variant, traffic) if x)
        ax.plot([r["tenants"] for r in rs], [r["retention"] for r in rs], marker="o", label=label)
        ax2.plot([r["tenants"] for r in rs], [r["p95_vs_one"] for r in rs], marker="o", label=label)
    goals = {ax: ((0.95, "goal at 1,000"), (0.9, "goal at 10,000")), ax2: ((1.5, "goal"),)}
    for a, what in ((ax, "retention (docs/s / one-adapter servers)"), (ax2, "p95 / one-adapter servers' p95")):
        a.set_xscale("log")
        a.set_xlabel("resident adapters (tenants)")
        a.set_ylabel(what)
        for (goal, name), style in zip(goals[a], ("--", ":")):
            a.axhline(goal, color="grey", linestyle=style, linewidth=0.8, label=f"{name}: {goal:g}")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("spacy-ptuning server: tenants of mixed kinds on one backbone", fontsize=10)
    fig.text(0.01, 0.01, caption[:220], fontsize=6)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ""


if __name__ == "__main__":
    main()
