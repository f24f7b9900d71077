"""Error messages, spaCy style: one place, numbered, each says what to do."""


class Errors:
    E001 = (
        "[E001] Could not load the backbone '{name}' ({reason}). spacy-ptuning "
        "loads backbones with Hugging Face transformers: give a local folder "
        "that holds config.json, the tokenizer files and the weights, or a Hub "
        "name with network access (set HF_HUB_OFFLINE=1 to fail fast without "
        "one). The embedded default is '{default}'. To point a saved pipeline "
        "at another copy, override the path at load time, e.g. spacy.load(path, "
        "config={{'components.NAME.model.tok2vec.backbone': '/path/to/model'}}), NAME being the component."
    )
    E002 = (
        "[E002] Backbone '{name}' has architecture '{model_type}', which "
        "spacy-ptuning does not support yet. Supported: {supported}."
    )
    E003 = (
        "[E003] Unknown P-Tuning method '{method}'. Choose one of: prefix "
        "(P-Tuning v2 deep prefixes), prompt_encoder (P-Tuning v1), prompt "
        "(prompt tuning)."
    )
    E004 = "[E004] num_virtual_tokens must be at least 1, got {n}."
    E005 = (
        "[E005] Unknown prompt encoder '{kind}' for method prompt_encoder. "
        "Choose 'lstm' or 'mlp'."
    )
    E006 = (
        "[E006] This adapter was trained on a different backbone. Expected "
        "{expected}, found {found} (loaded from '{name}'). Load it with the "
        "backbone it was trained on, e.g. spacy.load(path, config="
        "{{'components.NAME.model.tok2vec.backbone': '/path/to/that/model'}})."
    )
    E007 = (
        "[E007] The saved adapter does not fit this model: {detail}. The file "
        "may be corrupted or from another method/length configuration; check "
        "that the pipeline's config.cfg matches the saved weights."
    )
    E008 = "[E008] Could not read the saved adapter: {detail}. The file is corrupted or not a spacy-ptuning adapter."
    E009 = "[E009] Unknown dtype '{dtype}' for the backbone. Choose float32, bfloat16 or float16."
    E010 = (
        "[E010] The backbone '{name}' is missing the attention projections "
        "spacy-ptuning hooks into ({detail}); the checkpoint does not look like "
        "a standard '{model_type}' model."
    )
