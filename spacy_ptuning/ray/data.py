"""Batch annotation with Ray Data: a JSONL or Parquet dataset of texts (one
adapter for all rows, or an adapter name per row) annotated by workers that
each load the backbone once; resumable by output shard.

Two entry points (install with ``pip install "spacy-ptuning[ray]"``):

:class:`AdapterAnnotator`
    A callable class for ``Dataset.map_batches`` in your own Ray Data
    pipeline (``batch_format="pyarrow"``): each worker (actor) builds one
    :class:`~spacy_ptuning.pool.AdapterPool` (one backbone, adapters loaded
    on first use) and annotates each batch with
    :func:`~spacy_ptuning.mixed_batch.pipe_mixed`, so the rows of different
    adapters share backbone passes. It adds the columns ``ents`` (list of
    ``{start, end, label, text}``, character offsets) and ``cats``
    (label -> score), as ``doc_json`` of our server (plus the entity text).

:func:`annotate` (and ``python -m spacy ptuning annotate``)
    Files in, one output file per *shard* out: a shard is a fixed range of
    rows of one input file (``rows_per_shard``), written to a temporary name
    and renamed when complete. A rerun skips the shards whose file exists,
    so an interrupted job resumes where it stopped.

Why shards of our own instead of ``read_json(...).map_batches(...).write_json()``:
Ray Data's readers choose their blocks (by file and size) and its writers
name output files per write task with a fresh id, so a rerun cannot tell
which rows are done. A shard here is (input file, first row, row count),
stable across runs: the driver counts rows (line offsets of JSONL, Parquet
metadata), Ray Data runs ``map_batches`` over the shard list with an actor
pool of ``num_workers`` annotators, and each worker reads its rows, annotates
them and writes the shard. The input and output folders must be visible to
every worker (one machine, or a shared file system / object store mount).
"""
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import Errors, PTuningError

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(Errors.E036.format(what="spacy_ptuning.ray.data", error=e)) from e

from ..serving.mixed_batch import pipe_mixed
from ..serving.pool import AdapterPool, UnknownAdapter

logger = logging.getLogger("spacy_ptuning.ray_data")

MANIFEST = "_annotate.json"
JSONL = (".jsonl", ".json")
PARQUET = (".parquet",)
ENT_TYPE = pa.list_(pa.struct([("start", pa.int64()), ("end", pa.int64()), ("label", pa.string()), ("text", pa.string())]))
CATS_TYPE = pa.map_(pa.string(), pa.float64())


class AnnotationError(PTuningError, ValueError):
    """Bad input for batch annotation (the message says what and where)."""


# -- the annotator (one per worker) -----------------------------------------------


class AdapterAnnotator:
    """Annotates batches of rows with the adapters of a folder; built once per
    Ray Data worker (actor), so the backbone is loaded once per worker.

    adapters: a folder of saved pipelines (one per subfolder) or one pipeline folder.
    adapter: the adapter for every row; or adapter_column: the column that names each row's adapter.
    text_column: the column of texts.
    batch_size: rows per :func:`pipe_mixed` call (texts of several adapters share its backbone passes).

    Use as ``ds.map_batches(AdapterAnnotator, batch_format="pyarrow",
    fn_constructor_kwargs={...}, concurrency=N)``.
    """

    def __init__(
        self,
        adapters: Union[str, Path],
        adapter: Optional[str] = None,
        adapter_column: Optional[str] = None,
        text_column: str = "text",
        batch_size: int = 64,
        max_loaded: int = 8,
        max_batch_tokens: int = 4096,
    ):
        _check_choice(adapter, adapter_column)
        if ray.is_initialized() and ray.get_gpu_ids():  # num_gpus=...: this worker's GPU
            import spacy

            spacy.require_gpu(0)
        self.pool = AdapterPool(adapters, max_loaded=max_loaded, check_interval=None, compact=True)
        self.adapter = adapter
        self.adapter_column = adapter_column
        self.text_column = text_column
        self.batch_size = max(1, int(batch_size))
        self.max_batch_tokens = max_batch_tokens

    def names_for(self, columns: Dict[str, list], n: int, where: str, first_row: int = 0) -> List[str]:
        """Each row's adapter; raises AnnotationError naming unknown ones and their rows."""
        if self.adapter is not None:
            names = [self.adapter] * n
        else:
            if self.adapter_column not in columns:
                raise AnnotationError(Errors.E042.format(column=self.adapter_column, where=where, columns=sorted(columns)))
            names = [str(v) for v in columns[self.adapter_column]]
        known = set(self.pool.names())
        bad: Dict[str, List[int]] = {}
        for i, name in enumerate(names):
            if name not in known:
                bad.setdefault(name, []).append(first_row + i)
        if bad:
            name, rows = next(iter(bad.items()))
            raise AnnotationError(Errors.E038.format(
                name=name, count=len(rows), where=where, rows=", ".join(map(str, rows[:5])),
                known=", ".join(sorted(known)) or "none",
            ))
        return names

    def texts_for(self, columns: Dict[str, list], where: str) -> List[str]:
        if self.text_column not in columns:
            raise AnnotationError(Errors.E037.format(column=self.text_column, where=where, columns=sorted(columns)))
        return ["" if t is None else str(t) for t in columns[self.text_column]]

    def annotate(self, texts: Sequence[str], names: Sequence[str]) -> Tuple[List[list], List[dict]]:
        """(ents, cats) per text: ents as [{start, end, label, text}], cats as {label: score}."""
        ents: List[list] = []
        cats: List[dict] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(texts)))
            items = [(self._nlp(names[i]), texts[i]) for i in chunk]
            for doc in pipe_mixed(items, max_batch_tokens=self.max_batch_tokens):
                ents.append([{"start": e.start_char, "end": e.end_char, "label": e.label_, "text": e.text} for e in doc.ents])
                cats.append({label: float(score) for label, score in doc.cats.items()})
        return ents, cats

    def _nlp(self, name: str):
        try:
            return self.pool.get(name)
        except UnknownAdapter as e:  # removed since names_for
            raise AnnotationError(str(e)) from e

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        """A pyarrow batch with ``ents`` and ``cats`` columns added."""
        if not isinstance(batch, pa.Table):  # a dict of numpy arrays, or pandas
            batch = pa.Table.from_pandas(batch) if hasattr(batch, "to_pandas") or hasattr(batch, "iloc") else pa.table(batch)
        columns = {name: batch.column(name).to_pylist() for name in batch.column_names
                   if name in (self.text_column, self.adapter_column)}
        for name in batch.column_names:
            columns.setdefault(name, None)  # listed for the error messages
        texts = self.texts_for(columns, "this batch")
        names = self.names_for(columns, len(texts), "this batch")
        ents, cats = self.annotate(texts, names)
        return batch.append_column("ents", pa.array(ents, type=ENT_TYPE)).append_column(
            "cats", pa.array([list(c.items()) for c in cats], type=CATS_TYPE)
        )


# -- shards -------------------------------------------------------------------------


def input_files(path: Union[str, Path]) -> List[Path]:
    """The .jsonl/.json/.parquet files of ``path`` (a file, or a folder: sorted)."""
    path = Path(path)
    if path.is_file() and path.suffix in JSONL + PARQUET:
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in JSONL + PARQUET)
        if files:
            return files
    raise AnnotationError(Errors.E041.format(path=path))


def plan_shards(files: Sequence[Path], rows_per_shard: int) -> List[Dict[str, Any]]:
    """Shards: (file index, file, shard index, first row, rows, byte offset for JSONL)."""
    shards = []
    for f, path in enumerate(files):
        if path.suffix in PARQUET:
            n = pq.ParquetFile(path).metadata.num_rows
            for k, start in enumerate(range(0, n, rows_per_shard)):
                shards.append({"file": f, "path": str(path), "shard": k, "start": start,
                               "rows": min(rows_per_shard, n - start), "offset": -1})
            continue
        # JSONL: the byte offset of every rows_per_shard-th non-empty line.
        row, offset, k = 0, 0, 0
        current: Optional[Dict[str, Any]] = None
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    if row % rows_per_shard == 0:
                        current = {"file": f, "path": str(path), "shard": k, "start": row, "rows": 0, "offset": offset}
                        shards.append(current)
                        k += 1
                    current["rows"] += 1  # type: ignore[index]
                    row += 1
                offset += len(line)
    return shards


def shard_name(shard: Dict[str, Any], fmt: str) -> str:
    return f"part-{shard['file']:05d}-{shard['shard']:06d}.{fmt}"


def read_shard(shard: Dict[str, Any]) -> Tuple[Optional[List[dict]], Optional["pa.Table"]]:
    """The shard's rows: a list of dicts (JSONL) or a pyarrow table (Parquet)."""
    path = shard["path"]
    if int(shard["offset"]) < 0:
        pf = pq.ParquetFile(path)
        start, n = int(shard["start"]), int(shard["rows"])
        groups, first, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            if row + size > start and row < start + n:
                groups.append(g)
                first = row if first is None else first
            row += size
        table = pf.read_row_groups(groups)
        return None, table.slice(start - (first or 0), n)
    rows: List[dict] = []
    with open(path, "rb") as fh:
        fh.seek(int(shard["offset"]))
        while len(rows) < int(shard["rows"]):
            line = fh.readline()
            if not line:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise AnnotationError(f"{path}, row {int(shard['start']) + len(rows)}: not a JSON object ({e})") from e
    return rows, None


class _ShardWriter:
    """The ``map_batches`` callable of :func:`annotate`: one batch = one shard
    (read, annotated, written atomically); returns one summary row."""

    def __init__(self, output_dir: str, fmt: str, **annotator: Any):
        self.output_dir = Path(output_dir)
        self.fmt = fmt
        self.annotator = AdapterAnnotator(**annotator)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, list]:
        out: Dict[str, list] = {"shard": [], "rows": [], "seconds": [], "pid": []}
        n = len(batch["path"])
        for j in range(n):
            shard = {key: (batch[key][j].item() if hasattr(batch[key][j], "item") else batch[key][j]) for key in batch}
            start = time.perf_counter()
            rows = self.write(shard)
            out["shard"].append(shard_name(shard, self.fmt))
            out["rows"].append(rows)
            out["seconds"].append(time.perf_counter() - start)
            out["pid"].append(os.getpid())
        return out

    def write(self, shard: Dict[str, Any]) -> int:
        target = self.output_dir / shard_name(shard, self.fmt)
        if target.exists():  # done by an earlier try
            return int(shard["rows"])
        rows, table = read_shard(shard)
        where = f"{shard['path']} (rows {shard['start']}-{int(shard['start']) + int(shard['rows']) - 1})"
        if table is not None:
            columns = {name: None for name in table.column_names}
            for name in (self.annotator.text_column, self.annotator.adapter_column):
                if name in columns:
                    columns[name] = table.column(name).to_pylist()
            n = table.num_rows
        else:
            keys = {key for row in rows for key in row} if rows else set()
            columns = {key: None for key in keys}
            for name in (self.annotator.text_column, self.annotator.adapter_column):
                if name in columns:
                    columns[name] = [row.get(name) for row in rows]
            n = len(rows)
        texts = self.annotator.texts_for(columns, where)
        names = self.annotator.names_for(columns, n, where, first_row=int(shard["start"]))
        ents, cats = self.annotator.annotate(texts, names)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            if self.fmt == "parquet":
                if table is None:
                    table = pa.Table.from_pylist(rows)
                table = table.append_column("ents", pa.array(ents, type=ENT_TYPE))
                table = table.append_column("cats", pa.array([list(c.items()) for c in cats], type=CATS_TYPE))
                pq.write_table(table, tmp)
            else:
                if rows is None:
                    rows = table.to_pylist()
                with open(tmp, "w", encoding="utf8") as fh:
                    for row, e, c in zip(rows, ents, cats):
                        fh.write(json.dumps({**row, "ents": e, "cats": c}, ensure_ascii=False) + "\n")
            os.replace(tmp, target)  # a shard file exists only when complete
        finally:
            if tmp.exists():
                tmp.unlink()
        return n


# -- the job ------------------------------------------------------------------------


def annotate(
    input_path: Union[str, Path],
    output_dir: Union[str, Path],
    adapters: Union[str, Path],
    *,
    adapter: Optional[str] = None,
    adapter_column: Optional[str] = None,
    text_column: str = "text",
    num_workers: int = 2,
    batch_size: int = 64,
    rows_per_shard: int = 10_000,
    output_format: Optional[str] = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_loaded: int = 8,
    max_batch_tokens: int = 4096,
    overwrite: bool = False,
    address: Optional[str] = None,
) -> Dict[str, Any]:
    """Annotate a JSONL/Parquet file or folder with the adapters in
    ``adapters``; write one file per shard to ``output_dir``: the input
    columns plus ``ents`` and ``cats``. Returns a summary
    (``shards``, ``done`` (this run), ``skipped`` (already there), ``rows``,
    ``seconds``, ``workers`` (pids that wrote shards)).

    Give ``adapter`` (one for all rows) or ``adapter_column`` (a name per
    row); ``adapters`` may be a single pipeline folder (then ``adapter``
    defaults to its name). Rerun with the same arguments to resume: the
    shards already written are skipped. Starts a local Ray instance unless
    one is running (or ``address`` names a cluster).
    """
    started = time.perf_counter()
    adapters = Path(adapters)
    if adapter is None and adapter_column is None and (adapters / "config.cfg").exists():
        adapter = AdapterPool(adapters).names()[0]
    _check_choice(adapter, adapter_column)
    files = input_files(input_path)
    fmt = output_format or ("parquet" if files[0].suffix in PARQUET else "jsonl")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"output_format must be 'jsonl' or 'parquet', got {fmt!r}")
    if rows_per_shard < 1 or num_workers < 1 or batch_size < 1:
        raise ValueError("rows_per_shard, num_workers and batch_size must be at least 1")
    _check_first_row(files[0], text_column, adapter_column)
    if adapter is not None:  # a wrong name fails now, not in every worker
        AdapterPool(adapters, max_loaded=1)._entry(adapter)
    output_dir = Path(output_dir)
    manifest = {
        "version": 1,
        "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files],
        "adapters": str(adapters.resolve()),
        "adapter": adapter,
        "adapter_column": adapter_column,
        "text_column": text_column,
        "rows_per_shard": rows_per_shard,
        "format": fmt,
    }
    _prepare_output(output_dir, manifest, overwrite)
    shards = plan_shards(files, rows_per_shard)
    todo = [s for s in shards if not (output_dir / shard_name(s, fmt)).exists()]
    summary: Dict[str, Any] = {
        "shards": len(shards), "skipped": len(shards) - len(todo), "done": 0,
        "rows": sum(s["rows"] for s in shards), "output_dir": str(output_dir), "format": fmt, "workers": [],
    }
    if todo:
        own_ray = not ray.is_initialized()
        if own_ray:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        try:
            ds = ray.data.from_items(todo, override_num_blocks=len(todo))
            ds = ds.map_batches(
                _ShardWriter,
                batch_size=1,
                batch_format="numpy",
                fn_constructor_kwargs=dict(
                    output_dir=str(output_dir), fmt=fmt, adapters=str(adapters), adapter=adapter,
                    adapter_column=adapter_column, text_column=text_column, batch_size=batch_size,
                    max_loaded=max_loaded, max_batch_tokens=max_batch_tokens,
                ),
                concurrency=min(num_workers, len(todo)),
                num_cpus=num_cpus,
                num_gpus=num_gpus,
            )
            try:
                done = ds.take_all()
            except Exception as e:  # Ray wraps the worker's exception: surface ours
                ours = _find(e, PTuningError)
                if ours is not None:
                    raise AnnotationError(str(ours)) from e
                raise
        finally:
            if own_ray:
                ray.shutdown()
        summary["done"] = len(done)
        summary["workers"] = sorted({int(row["pid"]) for row in done})
    summary["seconds"] = time.perf_counter() - started
    return summary


def read_output(output_dir: Union[str, Path]) -> List[dict]:
    """Every row of an annotation output folder, in input order (tests, small outputs)."""
    output_dir = Path(output_dir)
    rows: List[dict] = []
    for path in sorted(output_dir.glob("part-*")):
        if path.suffix == ".parquet":
            for row in pq.read_table(path).to_pylist():
                row["cats"] = dict(row["cats"]) if row.get("cats") is not None else {}
                rows.append(row)
        else:
            with open(path, encoding="utf8") as fh:
                rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


def _check_choice(adapter: Optional[str], adapter_column: Optional[str]) -> None:
    if (adapter is None) == (adapter_column is None):
        got = "both" if adapter is not None else "neither"
        raise AnnotationError(Errors.E040.format(got=got))


def _check_first_row(path: Path, text_column: str, adapter_column: Optional[str]) -> None:
    """Missing columns fail before any worker starts (the first row of the
    first file; every shard checks its own rows again)."""
    if path.suffix in PARQUET:
        columns = pq.ParquetFile(path).schema_arrow.names
    else:
        columns = []
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    try:
                        columns = list(json.loads(line))
                    except (json.JSONDecodeError, TypeError) as e:
                        raise AnnotationError(f"{path}, row 0: not a JSON object ({e})") from e
                    break
    if text_column not in columns:
        raise AnnotationError(Errors.E037.format(column=text_column, where=str(path), columns=sorted(columns)))
    if adapter_column is not None and adapter_column not in columns:
        raise AnnotationError(Errors.E042.format(column=adapter_column, where=str(path), columns=sorted(columns)))


def _prepare_output(output_dir: Path, manifest: dict, overwrite: bool) -> None:
    path = output_dir / MANIFEST
    if output_dir.exists() and overwrite:
        import shutil

        shutil.rmtree(output_dir)
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise AnnotationError(Errors.E039.format(path=output_dir, reason="different " + ", ".join(diff)))
        return
    if output_dir.exists() and any(output_dir.glob("part-*")):
        raise AnnotationError(Errors.E039.format(path=output_dir, reason=f"shards without a {MANIFEST}"))
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)


def _find(e: BaseException, kind: type) -> Optional[BaseException]:
    """The first exception of ``kind`` in e's chain (Ray wraps worker errors)."""
    seen = set()
    stack: List[BaseException] = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, kind):
            return cur
        for attr in ("cause", "__cause__", "__context__"):
            nxt = getattr(cur, attr, None)
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    # Last resort: the message of ours inside Ray's text.
    text = str(e)
    if "[PT-E" in text:
        start = text.index("[PT-E")
        return AnnotationError(text[start:].splitlines()[0])
    return None


__all__ = ["AdapterAnnotator", "AnnotationError", "annotate", "read_output", "input_files", "plan_shards"]
