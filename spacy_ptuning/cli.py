"""The ``ptuning`` command group of spaCy's CLI: ``python -m spacy ptuning serve``.

spaCy 3 imports the modules that packages advertise in the ``spacy_cli``
entry-point group before it builds its command line (``registry.cli.get_all()``
in ``spacy.cli.setup_cli``); importing this one adds the ``ptuning`` group to
spaCy's typer app. Without spaCy's launcher, ``python -m spacy_ptuning.cli
serve ...`` runs the same command.

The server's own dependencies (FastAPI, uvicorn, prometheus-client) are the
``serve`` extra and are imported only when the command runs, so other spaCy
commands never need them.
"""
from pathlib import Path
from typing import Optional

import typer
from spacy.cli._util import Arg, Opt, app, import_code

ptuning_cli = typer.Typer(
    name="ptuning",
    help="spacy-ptuning commands: serve a folder of adapters over HTTP; annotate a dataset with Ray Data.",
    no_args_is_help=True,
)
app.add_typer(ptuning_cli)


@ptuning_cli.callback()
def _group() -> None:
    """spacy-ptuning commands (a group even with one command, so that
    ``python -m spacy_ptuning.cli serve`` reads as ``spacy ptuning serve``)."""

ADMIN_TOKEN_ENV = "SPACY_PTUNING_ADMIN_TOKEN"


@ptuning_cli.command("serve")
def serve_cli(
    # fmt: off
    adapters_dir: Path = Arg(..., help="Folder with one saved pipeline (nlp.to_disk) per subfolder; the subfolder's name is the adapter's name", exists=True, file_okay=False),
    host: str = Opt("127.0.0.1", "--host", help="Interface to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)"),
    port: int = Opt(8080, "--port", help="TCP port"),
    max_loaded: int = Opt(8, "--max-loaded", help="Most adapters kept loaded at once (least recently used ones are dropped; the backbone stays)"),
    batching: str = Opt("mixed", "--batching", help="mixed: one backbone pass for the texts of many adapters; per_adapter: each adapter's texts with its own nlp.pipe"),
    max_wait_ms: float = Opt(5.0, "--max-wait-ms", help="How long the batcher waits for more requests after the first one"),
    max_batch_texts: int = Opt(64, "--max-batch-texts", help="Most texts in one batch (a larger request runs as one batch of its own)"),
    max_batch_tokens: int = Opt(4096, "--max-batch-tokens", help="Most wordpieces (padded) in one backbone pass"),
    max_queue: int = Opt(1024, "--max-queue", help="Most texts accepted and not yet answered; beyond it requests get 503 with Retry-After"),
    timeout: float = Opt(30.0, "--timeout", help="Seconds a request may wait for its result before it gets 504"),
    max_items: int = Opt(512, "--max-items", help="Most texts/items in one request (413 beyond)"),
    max_chars: int = Opt(1_000_000, "--max-chars", help="Most characters of text in one request (413 beyond)"),
    max_body_bytes: int = Opt(2_000_000, "--max-body-bytes", help="Largest request body in bytes (413 beyond)"),
    preload: str = Opt("", "--preload", help="Adapters to load at start, comma-separated, or 'all'; /ready answers 200 once they are loaded"),
    check_interval: float = Opt(1.0, "--check-interval", help="Seconds between checks of an adapter's folder for changes (a changed folder is reloaded); negative: never"),
    admin_token: Optional[str] = Opt(None, "--admin-token", envvar=ADMIN_TOKEN_ENV, help=f"Bearer token for PUT/DELETE /adapters/NAME (also read from ${ADMIN_TOKEN_ENV}); without one those endpoints answer 403", show_default=False),
    code_path: Optional[Path] = Opt(None, "--code", "-c", help="Path to Python file with additional code (registered functions, custom components) to import before loading adapters"),
    log_level: str = Opt("info", "--log-level", help="uvicorn's log level"),
    # fmt: on
):
    """Serve the adapters in ADAPTERS_DIR over HTTP (FastAPI + uvicorn).

    Endpoints: GET /adapters, POST /adapters/NAME/process {"texts": [...]},
    POST /process {"items": [{"adapter": NAME, "text": ...}]}, GET /health,
    GET /ready, GET /metrics (Prometheus), and with --admin-token
    PUT /adapters/NAME {"path": ...} and DELETE /adapters/NAME.
    """
    try:
        from .server import ServeConfig, serve
    except ImportError as e:
        typer.echo(
            f"The server needs the 'serve' extra ({e}): pip install 'spacy-ptuning[serve]'", err=True
        )
        raise typer.Exit(1)
    if batching not in ("mixed", "per_adapter"):
        raise typer.BadParameter("choose 'mixed' or 'per_adapter'", param_hint="--batching")
    import_code(code_path)
    names = [n.strip() for n in preload.split(",") if n.strip()]
    config = ServeConfig(
        batching=batching,
        max_wait_ms=max_wait_ms,
        max_batch_texts=max_batch_texts,
        max_batch_tokens=max_batch_tokens,
        max_queue=max_queue,
        timeout_s=timeout,
        max_items=max_items,
        max_chars=max_chars,
        max_body_bytes=max_body_bytes,
        admin_token=admin_token or None,
        preload=names,
    )
    serve(
        adapters_dir,
        config,
        host=host,
        port=port,
        max_loaded=max_loaded,
        check_interval=None if check_interval < 0 else check_interval,
        log_level=log_level,
    )


@ptuning_cli.command("annotate")
def annotate_cli(
    # fmt: off
    input_path: Path = Arg(..., help="A .jsonl/.json (one object per line) or .parquet file, or a folder of them", exists=True),
    output_dir: Path = Arg(..., help="Folder for the output shards (input columns + ents + cats); rerun with the same arguments to resume"),
    adapters: Path = Arg(..., help="Folder with one saved pipeline per subfolder, or one pipeline folder", exists=True, file_okay=False),
    adapter: Optional[str] = Opt(None, "--adapter", help="The adapter for every row (or use --adapter-column)"),
    adapter_column: Optional[str] = Opt(None, "--adapter-column", help="The column that names each row's adapter"),
    text_column: str = Opt("text", "--text-column", help="The column of texts"),
    workers: int = Opt(2, "--workers", help="Ray Data workers; each loads the backbone once"),
    batch_size: int = Opt(64, "--batch-size", help="Texts per mixed-adapter batch in a worker"),
    rows_per_shard: int = Opt(10_000, "--rows-per-shard", help="Rows per output file (the unit of resumption)"),
    output_format: Optional[str] = Opt(None, "--format", help="jsonl or parquet (default: as the input)"),
    num_cpus: float = Opt(1.0, "--num-cpus", help="CPUs per worker"),
    num_gpus: float = Opt(0.0, "--num-gpus", help="GPUs per worker (> 0: the backbone runs on it)"),
    address: Optional[str] = Opt(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, or a local Ray instance)"),
    overwrite: bool = Opt(False, "--overwrite", help="Delete OUTPUT_DIR first instead of resuming"),
    code_path: Optional[Path] = Opt(None, "--code", "-c", help="Path to Python file with additional code to import before loading adapters"),
    # fmt: on
):
    """Annotate a JSONL/Parquet dataset with Ray Data (spacy_ptuning.ray_data):
    one file per shard of rows, resumable; needs the 'ray' extra."""
    try:
        from .errors import PTuningError
        from .ray_data import annotate
    except ImportError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1)
    import_code(code_path)
    try:
        summary = annotate(
            input_path, output_dir, adapters, adapter=adapter, adapter_column=adapter_column,
            text_column=text_column, num_workers=workers, batch_size=batch_size,
            rows_per_shard=rows_per_shard, output_format=output_format, num_cpus=num_cpus,
            num_gpus=num_gpus, overwrite=overwrite, address=address,
        )
    except PTuningError as e:  # bad input: the message says what to do
        typer.echo(str(e), err=True)
        raise typer.Exit(1)
    typer.echo(
        f"{summary['rows']} rows in {summary['shards']} shards -> {summary['output_dir']} "
        f"({summary['done']} written now, {summary['skipped']} already there; {summary['seconds']:.1f} s)"
    )


if __name__ == "__main__":
    ptuning_cli()
