"""What the server benchmarks share: the ten adapters of the load test, a
server in a child process on 127.0.0.1, its metrics, and bounded closed- and
open-loop clients (every run stops by time and request count)."""
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import common

ADAPTERS = [  # name, task, method, virtual tokens
    ("ner-prefix-16", "ner", "prefix", 16),
    ("ner-prefix-64", "ner", "prefix", 64),
    ("ner-prefix-8", "ner", "prefix", 8),
    ("ner-prompt-20", "ner", "prompt", 20),
    ("ner-p1-16", "ner", "prompt_encoder", 16),
    ("sst-prefix-20", "textcat", "prefix", 20),
    ("sst-prefix-32", "textcat", "prefix", 32),
    ("sst-prompt-20", "textcat", "prompt", 20),
    ("sst-prompt-8", "textcat", "prompt", 8),
    ("sst-p1-20", "textcat", "prompt_encoder", 20),
]
FACTORY = {"ner": "ptuning_ner", "textcat": "ptuning_textcat"}


def build_adapters(out: Path, data_dir: Path, rebuild: bool, ner_head: str = "parser") -> Dict[str, Path]:
    """Ten ptuning pipelines and ten spacy-transformers ones, initialised on
    the data's labels; saved once. ``ner_head="tagger"``: the NER kinds are
    ``ptuning_ner_tagger`` pipelines (in a folder of their own, without the
    spacy-transformers ones); "parser" (``ptuning_ner``) is what every
    serving result in RESULTS.md before 2026-12-07 used."""
    import spacy

    if ner_head == "tagger":
        out = out.with_name(out.name + "_tagger")
    if rebuild and out.exists():
        shutil.rmtree(out)
    ours, st = out / "ptuning", out / "st"
    ours.mkdir(parents=True, exist_ok=True)
    st.mkdir(parents=True, exist_ok=True)
    kinds = ("ptuning",) if ner_head == "tagger" else ("ptuning", "st")
    if all((out / kind / ADAPTERS[-1][0]).exists() for kind in kinds):
        return {"ptuning": ours, "st": st}
    factory = {**FACTORY, "ner": "ptuning_ner_tagger"} if ner_head == "tagger" else FACTORY
    vocab = spacy.blank("en").vocab
    samples = {
        "ner": common.read_conll(data_dir / "conll2003" / "train.iob", vocab, limit=200),
        "textcat": common.read_sst2(data_dir / "sst2" / "train.tsv", vocab, limit=200),
    }
    for name, task, method, n in ADAPTERS:
        for kind in kinds:
            if kind == "ptuning":
                nlp = spacy.blank("en")
                # named as before (the factory's name) for the parser kinds; "ner" for the tagger
                name_of_pipe = task if factory[task] == "ptuning_ner_tagger" else None
                nlp.add_pipe(factory[task], name=name_of_pipe,
                             config={"model": {"tok2vec": {"method": method, "num_virtual_tokens": n}}})
            else:
                nlp = common.st_pipeline(task)
            egs = common.examples(nlp, samples[task])
            nlp.initialize(lambda: egs)
            nlp.to_disk((ours if kind == "ptuning" else st) / name)
            print(f"built {kind}/{name}", flush=True)
    return {"ptuning": ours, "st": st}


def load_test_args(batching: str, max_loaded: int, preload: str, extra: Sequence[str] = ()) -> List[str]:
    """The serve options of the load tests: batching mode, pool size, no
    reload checks, the adapters to load at start ("" none, "all")."""
    args = ["--batching", batching, "--max-loaded", str(max_loaded), "--check-interval", "-1", *extra]
    return args + (["--preload", preload] if preload else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m spacy ptuning serve` in a child process on 127.0.0.1."""

    def __init__(self, folder: Path, args: Sequence[str] = (), src: Optional[Path] = None):
        """``args``: serve options after the folder and port; ``src``: run
        the spacy_ptuning of this source tree (e.g. a worktree of an older
        commit), else the installed one."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "spacy", "ptuning", "serve", str(folder), "--port", str(self.port),
               "--log-level", "warning", *args]
        env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1") if src is not None else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=src)

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server not ready")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def metrics(self) -> Dict[str, float]:
        """Prometheus text -> {'name{labels}': value}."""
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def metric(metrics: Dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.split("{")[0] == prefix)


async def send(http, url: str, name: str, text: str, latencies: list, statuses: dict) -> object:
    """One request of one text; its status (or the client error's name) is
    counted, its latency kept when answered 200."""
    import httpx

    start = time.perf_counter()
    try:
        r = await http.post(f"{url}/adapters/{name}/process", json={"texts": [text]})
        code = r.status_code
    except httpx.HTTPError as e:
        code = type(e).__name__
    statuses[code] = statuses.get(code, 0) + 1
    if code == 200:
        latencies.append(time.perf_counter() - start)
    return code


async def closed_loop(url, work, clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` clients, each sending its next request when the last one is
    answered, until the time or request budget is spent."""
    import httpx

    latencies, statuses, words = [], {}, 0
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(k: int, http):
        nonlocal sent, words
        rng = random.Random(k)
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            name, text = work(rng)
            if await send(http, url, name, text, latencies, statuses) == 200:
                words += len(text.split())

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    return {"seconds": time.perf_counter() - start, "latencies": latencies, "statuses": statuses, "words": words}


async def open_loop(url, work, rate: float, seconds: float, max_requests: int) -> dict:
    """Requests arriving at `rate` per second (Poisson), whatever the answers."""
    import httpx

    latencies, statuses = [], {}
    rng = random.Random(0)

    start = time.perf_counter()
    tasks = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        while time.perf_counter() - start < seconds and len(tasks) < max_requests:
            tasks.append(asyncio.create_task(send(http, url, *work(rng), latencies, statuses)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)  # nothing may hang
    return {"seconds": time.perf_counter() - start, "latencies": latencies, "statuses": statuses,
            "offered": len(tasks)}


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def tenant_texts(data_dir: Path, limit: Optional[int] = None) -> Dict[str, List[str]]:
    """One dev sentence a request, by task: CoNLL-2003 for NER adapters,
    SST-2 for sentiment ones (the first ``limit`` of each)."""
    import spacy

    vocab = spacy.blank("en").vocab
    return {
        "ner": [" ".join(common.words(d)) for d in common.read_conll(data_dir / "conll2003" / "dev.iob", vocab)][:limit],
        "textcat": [d.text for d in common.read_sst2(data_dir / "sst2" / "dev.tsv", vocab)][:limit],
    }
