"""A pipeline's adapters compacted for serving: in memory (the adapter pool)
or as a saved copy (``python -m spacy ptuning compact IN OUT``).

Compacting replaces each adapter's prompt module by the one row of prompts
it computes (``Adapter.compact``). A server needs only that row; a P-Tuning
v1 adapter saves a bi-LSTM and MLP of about 8 MB on MiniLM to produce a
row of tens of KB, and a load reads, checks and runs all of it. The saved
copy (adapter format /3, ``model.serialization``) holds the exact float32
row instead (or float16 rows and word features, half the bytes): it
predicts what the original predicts, loads like a prompt-tuning adapter,
and cannot be trained (PT-E049), so the original stays the one to train.
Why our own step rather than a config change: the row is the output of
trained weights, not a setting, and the copy keeps the original's config so
that the pool, the server and ``spacy.load`` read it as they read any
pipeline.
"""
import os
import shutil
import uuid
from pathlib import Path
from typing import List, Optional, Tuple, Union

from spacy.language import Language

from ..errors import ConfigError, Errors, PTuningError
from ..model.adapter import Adapter
from .half_storage import halve
from .transformer_model import find_adapter_layers


def compact_pipeline(nlp: Language, storage_dtype: Optional[str] = None) -> List[Adapter]:
    """Compact every adapter of ``nlp`` in place (``Adapter.compact`` with
    ``storage_dtype``; "float16" also halves our components' word
    features, ``half_storage``); returns the adapters."""
    found = []
    for _, pipe in nlp.pipeline:
        adapters = [adapter for _, _, adapter in find_adapter_layers(pipe)]
        for adapter in adapters:
            adapter.compact(storage_dtype)
        if storage_dtype == "float16" and adapters:  # our components' word features only
            halve(pipe.model)
        found.extend(adapters)
    return found


def save_compacted(source: Union[str, Path], output: Union[str, Path], force: bool = False,
                   storage_dtype: Optional[str] = None) -> Tuple[int, int, int]:
    """Load the pipeline at ``source``, compact its adapters to exact
    float32 rows and save it to ``output`` (written next to it and renamed
    into place, so a server watching the folder never sees half a copy).
    ``storage_dtype="float16"`` saves the rows and our components' word
    features (hash tables, maxout weights) in float16, as a server with
    ``--storage-dtype float16`` holds them: about half the bytes, the
    predictions those of the values rounded to float16. Returns (adapters
    compacted, bytes of ``source``, bytes of ``output``). ``source`` is never
    changed; an ``output`` that exists is replaced only with ``force``."""
    import spacy

    if storage_dtype not in (None, "float32", "float16"):
        raise ConfigError(Errors.E054.format(value=storage_dtype, why=" for a compacted copy", allowed=["float32", "float16"]))
    source, output = Path(source), Path(output)
    if not (source / "config.cfg").is_file():
        raise PTuningError(Errors.E059.format(path=source, why="it holds no config.cfg (not a saved pipeline folder)"))
    if output.resolve() == source.resolve():
        raise PTuningError(Errors.E059.format(path=source, why="the output is the source folder; give another folder, so that the trainable original stays"))
    if output.exists() and not force:
        raise PTuningError(Errors.E059.format(path=output, why="the output folder exists; give --force to replace it"))
    nlp = spacy.load(source)
    adapters = compact_pipeline(nlp, "float32")
    if storage_dtype == "float16":
        compact_pipeline(nlp, "float16")
    if not adapters:
        raise PTuningError(Errors.E059.format(path=source, why="its pipeline has no spacy-ptuning adapter to compact"))
    output.parent.mkdir(parents=True, exist_ok=True)
    hidden = f".{output.name}.{uuid.uuid4().hex}"  # a served folder's pool skips names with a leading dot
    staging, old = output.parent / f"{hidden}.tmp", output.parent / f"{hidden}.old"
    moved = False
    try:
        nlp.to_disk(staging)  # mkdir: the umask's modes, as for any saved pipeline
        if output.exists():
            os.replace(output, old)  # moved, not deleted first: the name is missing for two renames only
            moved = True
        os.replace(staging, output)
    except BaseException:
        if moved and not output.exists():
            os.replace(old, output)  # the copy could not take its place: the old output stays
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    return len(adapters), _folder_bytes(source), _folder_bytes(output)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
