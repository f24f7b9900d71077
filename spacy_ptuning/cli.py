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
import dataclasses
import inspect
from pathlib import Path
from typing import Optional

import typer
from spacy.cli._util import Arg, Opt, app, import_code

from .serving.serve_config import ServeConfig, config_fields

ptuning_cli = typer.Typer(
    name="ptuning",
    help="spacy-ptuning commands: serve a folder of adapters over HTTP; save a compacted serving copy; annotate a dataset with Ray Data.",
    no_args_is_help=True,
)
app.add_typer(ptuning_cli)


@ptuning_cli.callback()
def _group() -> None:
    """spacy-ptuning commands (a group even with one command, so that
    ``python -m spacy_ptuning.cli serve`` reads as ``spacy ptuning serve``)."""

ADMIN_TOKEN_ENV = "SPACY_PTUNING_ADMIN_TOKEN"
API_TOKEN_ENV = "SPACY_PTUNING_API_TOKEN"
_ENV = {"admin_token": ADMIN_TOKEN_ENV, "api_token": API_TOKEN_ENV}
_LISTS = ("preload", "allowed_hosts")  # comma-separated on the command line


def serve_cli(**options):
    """Serve the adapters in ADAPTERS_DIR over HTTP (FastAPI + uvicorn).

    Endpoints: GET /adapters, POST /adapters/NAME/process {"texts": [...]},
    POST /process {"items": [{"adapter": NAME, "text": ...}]}, GET /health,
    GET /ready, GET /metrics (Prometheus), and with --admin-token
    PUT /adapters/NAME {"path": ...} and DELETE /adapters/NAME. Every limit
    and what a client gets past it: docs/serving.md.
    """
    try:
        from .serving.server import serve
    except ImportError as e:
        typer.echo(
            f"The server needs the 'serve' extra ({e}): pip install 'spacy-ptuning[serve]'", err=True
        )
        raise typer.Exit(1)
    adapters_dir = options.pop("adapters_dir")
    host, port, max_loaded = options.pop("host"), options.pop("port"), options.pop("max_loaded")
    max_resident_mb = options.pop("max_resident_mb") or None
    check_interval, log_level = options.pop("check_interval"), options.pop("log_level")
    import_code(options.pop("code_path"))
    for name in _LISTS:
        value = options.get(name)
        options[name] = [n.strip() for n in value.split(",") if n.strip()] if value else (None if name == "allowed_hosts" else [])
    for name in ("admin_token", "api_token", "dtype", "storage_dtype", "admin_root"):
        options[name] = options.get(name) or None
    try:
        config = ServeConfig(**options)
    except ValueError as e:
        raise typer.BadParameter(str(e))
    serve(adapters_dir, config, host=host, port=port, max_loaded=max_loaded, max_resident_mb=max_resident_mb,
          check_interval=None if check_interval < 0 else check_interval, log_level=log_level)


def _serve_signature() -> inspect.Signature:
    """The command's options: a few of its own, then one per ServeConfig
    field (its flag, default and help from there)."""
    P = inspect.Parameter
    params = [
        P("adapters_dir", P.KEYWORD_ONLY, annotation=Path, default=Arg(..., help="Folder with one saved pipeline (nlp.to_disk) per subfolder; the subfolder's name is the adapter's name", exists=True, file_okay=False)),
        P("host", P.KEYWORD_ONLY, annotation=str, default=Opt("127.0.0.1", "--host", help="Interface to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)")),
        P("port", P.KEYWORD_ONLY, annotation=int, default=Opt(8080, "--port", help="TCP port")),
        P("max_loaded", P.KEYWORD_ONLY, annotation=int, default=Opt(8, "--max-loaded", help="Most adapters kept loaded at once (least recently used ones are dropped; the backbone stays)")),
        P("max_resident_mb", P.KEYWORD_ONLY, annotation=float, default=Opt(0.0, "--max-resident-mb", help="Most megabytes of adapters kept loaded (prompts, heads, word features; the shared backbone not counted); least recently used ones are dropped beyond; 0: by --max-loaded alone")),
        P("check_interval", P.KEYWORD_ONLY, annotation=float, default=Opt(1.0, "--check-interval", help="Seconds between checks of an adapter's folder for changes (a changed folder is reloaded, a deleted one is gone); negative: never")),
        P("code_path", P.KEYWORD_ONLY, annotation=Optional[Path], default=Opt(None, "--code", "-c", help="Path to Python file with additional code (registered functions, custom components) to import before loading adapters")),
        P("log_level", P.KEYWORD_ONLY, annotation=str, default=Opt("info", "--log-level", help="uvicorn's log level (info: one JSON access-log line per request)")),
    ]
    for name, default, flag, help_text in config_fields():
        kind = _FIELD_TYPES[name]
        if name in _LISTS:
            kind, default = str, ",".join(default or ())
        extra = {"envvar": _ENV[name], "show_default": False} if name in _ENV else {}
        params.append(P(name, P.KEYWORD_ONLY, annotation=kind, default=Opt(default, flag, help=help_text, **extra)))
    return inspect.Signature(params)


_FIELD_TYPES = {
    f.name: (Optional[str] if f.type in (Optional[str], "Optional[str]") else bool if f.type in (bool, "bool")
             else int if f.type in (int, "int") else float if f.type in (float, "float") else str)
    for f in dataclasses.fields(ServeConfig)
}
serve_cli.__signature__ = _serve_signature()  # type: ignore[attr-defined]
serve_cli.__annotations__ = {p.name: p.annotation for p in serve_cli.__signature__.parameters.values()}  # type: ignore[attr-defined]
ptuning_cli.command("serve")(serve_cli)


@ptuning_cli.command("compact")
def compact_cli(
    # fmt: off
    source: Path = Arg(..., help="A saved pipeline folder (nlp.to_disk) with spacy-ptuning components; never changed", exists=True, file_okay=False),
    output: Path = Arg(..., help="Folder for the compacted copy (written beside it, then renamed into place)"),
    force: bool = Opt(False, "--force", "-F", help="Replace OUTPUT if it exists"),
    storage_dtype: Optional[str] = Opt(None, "--storage-dtype", help="float16: save the prompt rows and word features in float16 (about half the bytes; predictions those of the rounded values, as a server with --storage-dtype float16); default: float32, exact"),
    code_path: Optional[Path] = Opt(None, "--code", "-c", help="Path to Python file with additional code to import before loading"),
    # fmt: on
):
    """Save a serving copy of a pipeline: each adapter's prompt module (a
    P-Tuning v1 encoder, a prefix MLP) replaced by the prompts it computes.
    It predicts the same and loads faster, but cannot be trained: keep
    SOURCE to train (spacy_ptuning.pipeline.compaction)."""
    from .errors import PTuningError
    from .pipeline.compaction import save_compacted

    import_code(code_path)
    try:
        count, before, after = save_compacted(source, output, force=force, storage_dtype=storage_dtype)
    except PTuningError as e:  # bad input: the message says what to do
        typer.echo(str(e), err=True)
        raise typer.Exit(1)
    typer.echo(f"{count} adapter(s) compacted: {output} ({after / 2**20:.2f} MB; {source}: {before / 2**20:.2f} MB)")


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
    """Annotate a JSONL/Parquet dataset with Ray Data (spacy_ptuning.ray.data):
    one file per shard of rows, resumable; needs the 'ray' extra."""
    try:
        from .errors import PTuningError
        from .ray.data import annotate
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
