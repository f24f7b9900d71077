"""The server's settings: :class:`ServeConfig`, each setting's default,
help text and command-line flag written once, here.

``cli.py`` builds the ``serve`` command's options from these fields,
``ray_serve.build_app`` converts its string arguments by their types, and a
test checks the option table of docs/serving.md against them. No FastAPI
import: the CLI reads this without the ``serve`` extra.
"""
from dataclasses import dataclass, field, fields
from typing import Any, List, Optional, Sequence, Tuple

BATCHING = ("mixed", "per_adapter")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _opt(default, help: str, flag: Optional[str] = None, **kw):
    """A setting: its default, its help text and its command-line flag, in
    one place (``cli.py`` and ``docs/serving.md`` are checked against it)."""
    meta = {"help": help, "flag": flag}
    if callable(default):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ServeConfig:
    """Server settings (the ``serve`` command's options); every default is
    written here once."""

    batching: str = _opt("mixed", "mixed: one backbone pass for the texts of many adapters; per_adapter: each adapter's texts with its own nlp.pipe")
    max_wait_ms: float = _opt(5.0, "How long the batcher waits for more requests after the first one")
    max_batch_texts: int = _opt(64, "Most texts in one batch (a larger request is split over several)")
    max_batch_tokens: int = _opt(4096, "Most wordpieces in one batch and in one backbone pass (a longer text runs alone)")
    max_queue: int = _opt(1024, "Most texts accepted and not yet answered; 503 with Retry-After beyond")
    max_queue_wait_s: float = _opt(2.0, "Most seconds of work (queued wordpieces / measured rate) a new request may queue behind; 503 with Retry-After beyond", "--max-queue-wait")
    timeout_s: float = _opt(30.0, "Seconds a request may wait for its result; 504 beyond (its texts not yet started are dropped)", "--timeout")
    max_items: int = _opt(512, "Most texts/items in one request; 413 beyond")
    max_request_adapters: int = _opt(64, "Most different adapters named in one /process request; 413 beyond (each is loaded and held while the request runs)")
    max_chars: int = _opt(1_000_000, "Most characters of text in one request; 413 beyond")
    max_text_wordpieces: int = _opt(4096, "Most wordpieces in one text; 413 beyond (split long texts)")
    max_body_bytes: int = _opt(2_000_000, "Largest request body in bytes; 413 beyond")
    read_timeout_s: float = _opt(10.0, "Seconds a client has to send its request line, headers and body; the connection is closed (headers) or answered 408 (body) beyond", "--read-timeout")
    max_connections: int = _opt(512, "Most open connections and requests in flight; 503 beyond (uvicorn's limit_concurrency)")
    threads: int = _opt(1, "torch intra-op threads of the server process (0: torch's default, one per core); see docs/serving.md for why 1")
    dtype: Optional[str] = _opt(None, "Load every adapter's backbone in this dtype (float32: results that do not depend on the batch); default: as each adapter was saved")
    storage_dtype: Optional[str] = _opt(None, "Hold each resident adapter's prompt row and word features (hash tables, maxout weights) in this dtype (float16: about half an adapter's bytes, predictions those of the values rounded to float16; checked by the adapter pool, PT-E054); default: as computed")
    admin_token: Optional[str] = _opt(None, "Bearer token for PUT/DELETE /adapters/NAME (also $SPACY_PTUNING_ADMIN_TOKEN); off without")
    admin_root: Optional[str] = _opt(None, "The folder under which PUT /adapters/NAME may take pipeline folders (default: the adapters folder)")
    api_token: Optional[str] = _opt(None, "Bearer token for the inference and listing endpoints (also $SPACY_PTUNING_API_TOKEN); open without. /health, /ready and /metrics stay open")
    allowed_hosts: Optional[Sequence[str]] = _opt(None, "Host header values accepted, comma-separated (400 otherwise); default: the loopback names when bound to a loopback address, any otherwise")
    docs: bool = _opt(False, "Serve the OpenAPI schema and pages (/docs, /redoc, /openapi.json)")
    drain_s: float = _opt(0.0, "On SIGTERM: seconds to keep serving with /ready answering 503 before the listening socket closes (requests in flight are finished either way)", "--drain-seconds")
    preload: Sequence[str] = _opt(tuple, "Adapters to load at start, comma-separated, or 'all'; /ready answers 200 once they are loaded")
    retry_after_s: int = _opt(1, "The smallest Retry-After of a 503")
    gc_freeze_s: float = _opt(5.0, "While adapters load: seconds between freezes of the process's objects out of the cycle collector (gc.freeze), and one after the last load; 0: never (full collections then walk every resident adapter: 3.5 s at 10,000). See docs/serving.md", "--gc-freeze-interval")
    metrics_adapters: int = _opt(100, "Most adapters with /metrics series of their own (the first whose texts ran); the others are counted under adapter=\"_other\", so that thousands of adapters, or requests naming unknown ones, do not make thousands of series (each about 115 Python objects)")
    loads_between_batches: bool = _opt(False, "Run adapter loads for requests between batches (a cold request also waits for a batch; warm traffic keeps more of its pace during a burst of loads) instead of beside them, one at a time (a cold request waits for its own load, then joins the next batch). See docs/serving.md")
    load_share: float = _opt(0.5, "Share of the time that loading adapters for requests may take while batches wait or run (1: no limit; loads beside batches then starve warm traffic during a burst of cold requests); cold requests that could not be loaded within half of --timeout get 503 with Retry-After. See docs/serving.md")

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {self.batching!r}")
        for name in ("max_batch_texts", "max_batch_tokens", "max_queue", "max_items", "max_request_adapters", "max_chars",
                     "max_body_bytes", "max_text_wordpieces", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.timeout_s <= 0 or self.max_wait_ms < 0 or self.max_queue_wait_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("timeout_s, max_queue_wait_s and read_timeout_s must be positive and max_wait_ms at least 0")
        if not 0 < self.load_share <= 1:
            raise ValueError(f"load_share must be above 0 and at most 1, got {self.load_share!r}")
        if self.threads < 0 or self.drain_s < 0 or self.gc_freeze_s < 0 or self.metrics_adapters < 0:
            raise ValueError("threads, drain_s, gc_freeze_s and metrics_adapters must be at least 0")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")


def config_fields() -> List[Tuple[str, Any, str, str]]:
    """(field, default, flag, help) of every setting, for the CLI and docs."""
    out = []
    for f in fields(ServeConfig):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        out.append((f.name, default, flag, f.metadata["help"]))
    return out


def options_table() -> str:
    """The markdown table of the ``serve`` options that come from
    ServeConfig (docs/serving.md holds it between its options markers; a
    test checks they agree): ``python -m spacy_ptuning.serve_config``."""
    rows = ["| option | default | |", "| --- | --- | --- |"]
    for name, default, flag, help_text in config_fields():
        if isinstance(default, (tuple, list)):
            default = ",".join(default) or "none"
        elif default is None:
            default = "none"
        elif isinstance(default, bool):
            default = "off" if not default else "on"
        rows.append(f"| `{flag}` | {default} | {help_text} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(options_table(), end="")
