"""Error messages and exception types, spaCy style: one place, numbered, each
says what to do.

Our codes live in their own namespace (``[PT-E001]``), so they never collide
with spaCy's ``[E001]``; and our exceptions share a base class
(:class:`PTuningError`), so code that must tell ours apart (e.g. the
component's load wrapper) checks the type, not the message text.
"""


class ErrorsWithCodes(type):
    """``Errors.E001`` reads as ``"[PT-E001] message"`` (spaCy's pattern)."""

    def __getattribute__(self, code: str) -> str:
        msg = super().__getattribute__(code)
        if code.startswith("__"):
            return msg
        return f"[PT-{code}] {msg}"


class PTuningError(Exception):
    """Base of every exception spacy-ptuning raises itself."""


class ConfigError(PTuningError, ValueError):
    """A setting that cannot work (bad method, length, dtype, option...)."""


class BackboneError(PTuningError, OSError):
    """The backbone could not be loaded."""


class AdapterError(PTuningError, ValueError):
    """A saved adapter does not fit, or cannot be read, or is not for this backbone."""


class Errors(metaclass=ErrorsWithCodes):
    E001 = (
        "Could not load the backbone '{name}' ({reason}). spacy-ptuning "
        "loads backbones with Hugging Face transformers: give a local folder "
        "that holds config.json, the tokenizer files and the weights, or a Hub "
        "name with network access (set HF_HUB_OFFLINE=1 to fail fast without "
        "one). The embedded default is '{default}'. To point a saved pipeline "
        "at another copy, override the path at load time, e.g. spacy.load(path, "
        "config={{'components.NAME.model.tok2vec.backbone': '/path/to/model'}}), NAME being the component."
    )
    E002 = (
        "Backbone '{name}' has architecture '{model_type}', which "
        "spacy-ptuning does not support yet. Supported: {supported}."
    )
    E003 = "Unknown P-Tuning method '{method}'. Choose one of: {choices}."
    E004 = "num_virtual_tokens must be at least 1, got {n}."
    E005 = (
        "Unknown prompt encoder '{kind}' for method prompt_encoder. "
        "Choose 'lstm' or 'mlp'."
    )
    E006 = (
        "This adapter was trained on a different backbone: {difference}. "
        "Expected {expected}, found {found} (loaded from '{name}'). Load it "
        "with the backbone it was trained on, e.g. spacy.load(path, config="
        "{{'components.NAME.model.tok2vec.backbone': '/path/to/that/model'}})."
    )
    E007 = (
        "The saved adapter does not fit this model: {detail}. The file "
        "may be corrupted or from another method/length configuration; check "
        "that the pipeline's config.cfg matches the saved weights."
    )
    E008 = "Could not read the saved adapter: {detail}. The file is corrupted or not a spacy-ptuning adapter."
    E009 = "Unknown dtype '{dtype}' for the backbone. Choose {choices}."
    E010 = (
        "The backbone '{name}' is missing the attention projections "
        "spacy-ptuning hooks into ({detail}); the checkpoint does not look like "
        "a standard '{model_type}' model."
    )
    E011 = (
        "Option {option} = {value!r} does not apply to method '{method}' "
        "(it is used by: {used_by}). Remove it, or choose that method."
    )
    E012 = "{option} must be {rule}, got {value!r}."
    E013 = (
        "Method '{method}' with {n} virtual tokens leaves {left} of the "
        "backbone's {max_length} positions for the text; at least {minimum} "
        "are needed. Use at most {most} virtual tokens, or method 'prefix' "
        "(P-Tuning v2 prefixes take no positions)."
    )
    E014 = (
        "The saved adapter holds non-finite values (NaN or infinity) in "
        "'{tensor}'. It was saved from a diverged training run or the file is "
        "damaged: retrain it, or load an earlier checkpoint (e.g. model-best "
        "instead of model-last)."
    )
    E015 = (
        "The saved adapter's weights do not match their checksum (expected "
        "{expected}, found {found}): the file was damaged after it was saved. "
        "Restore it from a copy or retrain it."
    )
    E016 = (
        "The saved adapter has format '{found}', which this version of "
        "spacy-ptuning cannot read (it reads {known}). It was saved by a newer "
        "spacy-ptuning: upgrade spacy-ptuning to load it."
    )
    E020 = (
        "The span getter's stride ({stride}) must be at least 1 and at most its "
        "window ({window}): strided spans start every `stride` tokens and hold "
        "`window` tokens, so a larger stride skips tokens, which would get zero "
        "vectors. Use stride <= window (e.g. window = 128, stride = 96: windows "
        "overlap by 32 tokens) in [components.NAME.model.tok2vec.get_spans]."
    )
    E021 = (
        "The span getter {getter} gave no window to {missing} of the {total} "
        "tokens of doc {doc} in this batch (first: token {first}, '{text}'); they "
        "would get zero vectors. A span getter must return spans of that doc "
        "that cover all its tokens: use spacy-transformers.strided_spans.v1 "
        "(stride <= window), doc_spans.v1 or sent_spans.v1, or fix the getter."
    )
    E022 = (
        "thinc is set to run on the GPU (spacy train --gpu-id, spacy.require_gpu "
        "or prefer_gpu), but {reason}, so the backbone cannot go to the GPU. "
        "Install a CUDA build of torch and a matching CuPy (as in docs/gpu.md: "
        "pip install torch --index-url https://download.pytorch.org/whl/cu121, "
        "picking your CUDA version, and pip install cupy-cuda12x), or run on the "
        "CPU (leave out --gpu-id, or --gpu-id -1)."
    )
    # Adapter pool and server (E030-E049).
    E030 = "max_loaded must be at least 1, got {value!r}."
    E031 = (
        "Adapter folder '{path}' does not exist. Give a folder that holds one "
        "saved pipeline (nlp.to_disk) per subfolder, or one pipeline folder."
    )
    E032 = (
        "Adapter '{name}': '{location}' is neither a saved pipeline folder (it "
        "has no config.cfg) nor an installed spaCy package."
    )
    E033 = (
        "Unknown adapter '{name}'. List the adapters with GET /adapters (the "
        "server) or AdapterPool.names(); a name is a subfolder of the adapters "
        "folder, or one added with PUT /adapters/NAME."
    )
    E034 = "Adapter '{name}' could not be loaded: {error}"
    E035 = (
        "Invalid adapter name {name}: use 1-128 letters, digits, '_', '-' "
        "or '.', starting with a letter or digit (names never become paths)."
    )
    # Scale-out on Ray (E036-E043): spacy_ptuning.ray.serve, spacy_ptuning.ray.data.
    E036 = (
        "{what} needs Ray ({error}). Install the 'ray' extra: "
        "pip install \"spacy-ptuning[ray]\" (Ray Serve and Ray Data)."
    )
    E037 = (
        "The text column '{column}' is not in {where}; its columns are: {columns}. "
        "Name the column that holds the texts with text_column= (--text-column)."
    )
    E038 = (
        "Unknown adapter '{name}' in {count} row(s) of {where} (first rows: {rows}). "
        "Known adapters: {known}. Fix the adapter column, or add the adapter to the folder."
    )
    E039 = (
        "The output folder '{path}' holds shards of a different run ({reason}). "
        "Shards are skipped on a rerun only for the same input files, adapters, "
        "columns and rows per shard; use a new output folder, or delete this one "
        "(--overwrite) to start again."
    )
    E040 = (
        "Give exactly one of adapter= (--adapter NAME: one adapter for every row) "
        "and adapter_column= (--adapter-column COLUMN: an adapter name per row); got {got}."
    )
    E041 = "No input files: '{path}' is not a .jsonl/.json/.parquet file or a folder holding such files."
    E042 = (
        "The adapter column '{column}' is not in {where}; its columns are: {columns}."
    )
    E043 = (
        "Adapter '{name}': the replica processing the request was lost ({error}) and "
        "{tries} tries failed; nothing was answered for these texts. Ray restarts "
        "lost replicas: retry the request."
    )
    # Adapter pool and server, continued.
    E044 = (
        "PUT /adapters/NAME takes only folders inside the server's admin root "
        "(--admin-root; by default the adapters folder); '{path}' is outside it. "
        "Copy the pipeline folder under the admin root and give its path."
    )
    E045 = (
        "'{path}' is not a saved pipeline folder (no config.cfg inside the admin "
        "root). Give a folder written by nlp.to_disk; installed packages are not "
        "taken over HTTP."
    )
    # Reading more of the backbone (E046-E048): spacy_ptuning.model.layer_mix,
    # spacy_ptuning.pipeline.word_features.
    E046 = (
        "layer_mix = {value} cannot be used: {problem}. This backbone has {count} "
        "hidden states: 0 (the embedding output) to {last} (the last layer); "
        "negative indices count from the end. Set e.g. layer_mix = [-1, -2, -3, -4], "
        "or null for the last layer alone."
    )
    E047 = (
        "WordFeatures: {option} = {value} cannot be used; it must be {rule}. "
        "Set it in the [...tok2vec.word_features] block, or set word_features = null "
        "to use no word features."
    )
    E048 = (
        "word_features must be a thinc model from docs to one vector per token "
        "(e.g. spacy_ptuning.WordFeatures.v1 or spacy.Tok2Vec.v2) with its output "
        "width (nO) set; got {found}."
    )

    # Serving many adapters (E049-): spacy_ptuning.model.adapter, serving.pool.
    E049 = (
        "This adapter was compacted for serving (its prompt module replaced by "
        "the prompts it computes, to save memory: AdapterPool(compact=True), "
        "Adapter.compact, or a copy saved by 'spacy ptuning compact') and "
        "cannot be {action}. To train it, or to save it in full, load the "
        "pipeline it was made from (spacy.load of the original folder; a copy "
        "saved compacted holds no prompt module to train)."
    )
    E050 = (
        "This adapter holds {mb:.2f} MB when loaded, more than the whole memory "
        "budget of the pool ({budget:.2f} MB, --max-resident-mb): it can never be "
        "resident. Raise --max-resident-mb above {mb:.2f}, or serve the adapter "
        "from a pool of its own."
    )
    E051 = (
        "max_resident_mb must be a positive number of megabytes (or None: a "
        "budget by count alone, --max-loaded); got {value!r}."
    )
    E052 = (
        "The folder '{location}' changed while it was being loaded, {attempts} "
        "times in a row, so no consistent version of it could be read. Write a new "
        "version to a temporary folder next to it and rename it into place (an "
        "atomic replace), rather than rewriting files in the served folder."
    )
    E053 = (
        "TextCatAttention: {option} = {value} cannot be used; it must be {rule}. "
        "Set it in the [components.<textcat>.model] block."
    )
    E054 = (
        "storage_dtype = {value!r} cannot be used{why}. Give one of {allowed} "
        "(--storage-dtype float16 holds a resident adapter's prompts and "
        "word-feature tables in half the bytes), or leave it unset to hold them "
        "as computed."
    )
    E055 = (
        "The entity tagger '{name}' cannot take the label {label}: an entity "
        "label is a non-empty string without leading or trailing spaces. Fix "
        "the label in the training data or in [initialize.components.{name}.labels]."
    )
    E056 = (
        "The entity tagger '{name}' is already initialised with the labels "
        "{labels}, and its softmax cannot grow. Add every label before "
        "nlp.initialize() (or list them in [initialize.components.{name}.labels]), "
        "or train a new component."
    )
    E057 = (
        "The entity tagger '{name}' found no entity in its initialisation "
        "examples, so it has no label to learn. Check that the training corpus "
        "has entities (doc.ents), or give the labels in "
        "[initialize.components.{name}.labels]."
    )
    E058 = (
        "The entity tagger '{name}' was given the gold tags {tags}, whose "
        "entity types are not among its labels {labels}. Initialise it on data "
        "that has every type (or list them in "
        "[initialize.components.{name}.labels]), or remove those entities."
    )

    E059 = (
        "Cannot make a compacted copy of '{path}': {why}. Usage: python -m "
        "spacy ptuning compact SOURCE OUTPUT [--force], where SOURCE is a "
        "pipeline folder saved by nlp.to_disk with spacy-ptuning components."
    )


def errors_table() -> str:
    """The markdown table of every code and message template (docs/errors.md
    holds it after its header; a test checks they agree):
    ``python -m spacy_ptuning.errors``."""
    rows = ["| code | message template |", "| --- | --- |"]
    for code in sorted(k for k in vars(Errors) if k.startswith("E") and k[1:].isdigit()):
        message = type.__getattribute__(Errors, code).replace("|", "\\|")
        rows.append(f"| `PT-{code}` | {message} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(errors_table(), end="")
