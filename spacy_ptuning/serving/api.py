"""The HTTP API that both front ends answer (``server.py``, and
``ray_serve.py`` on Ray Serve): request bodies, the checks of a request's
texts, the status and public message of each failure, the result JSON.

No web framework here: each check raises :class:`RequestError` (status,
detail, headers), which a front end turns into its HTTP answer.
"""
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pydantic import BaseModel

from .batcher import QueueFull, ShuttingDown, estimate_wordpieces
from .load_budget import LoadsBusy
from .pool import InvalidAdapterName, UnknownAdapter


class TextsIn(BaseModel):
    texts: List[str]


class ItemIn(BaseModel):
    adapter: str
    text: str


class ItemsIn(BaseModel):
    items: List[ItemIn]


class AdapterPathIn(BaseModel):
    path: str


class RequestError(Exception):
    """A request refused as a whole: its HTTP status and detail."""

    def __init__(self, status: int, detail: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def doc_json(doc) -> Dict[str, Any]:
    """The parts of ``Doc.to_json`` the components set: text, entities with
    character offsets, categories."""
    return {
        "text": doc.text,
        "ents": [{"start": e.start_char, "end": e.end_char, "label": e.label_} for e in doc.ents],
        "cats": {label: float(score) for label, score in doc.cats.items()},
    }


# -- checks of a request's texts ---------------------------------------------


def check_texts(config, texts: Sequence[str], field: str = "texts") -> None:
    """Counts (413), characters (413) and valid Unicode (422, naming the
    text): everything that needs no adapter."""
    if len(texts) > config.max_items:
        raise RequestError(
            413, f"{len(texts)} texts in one request; this server takes at most {config.max_items} "
                 "(--max-items). Split the request.",
        )
    chars = sum(len(t) for t in texts)
    if chars > config.max_chars:
        raise RequestError(
            413, f"{chars} characters of text in one request; this server takes at most "
                 f"{config.max_chars} (--max-chars). Split the request.",
        )
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(
                422, f"{field}[{i}] is not valid Unicode: it holds a lone surrogate (\\u{ord(text[e.start]):04x}) "
                     f"at character {e.start}. Send UTF-8 text (encode surrogate pairs as one character).",
            )


def check_adapters(config, names: Sequence[str]) -> None:
    """413 for a request naming more different adapters than
    ``max_request_adapters``: each one named is loaded (if cold) and held
    until the request is answered, so one request naming thousands would
    load them all at once, past the pool's bound, and time out doing it."""
    if len(names) > config.max_request_adapters:
        raise RequestError(
            413, f"{len(names)} different adapters in one request; this server takes at most "
                 f"{config.max_request_adapters} (--max-request-adapters). Split the request by adapter.",
        )


def wordpiece_costs(config, nlp, texts: Sequence[str], field: str = "texts", offset: int = 0) -> List[int]:
    """Each text's wordpieces under the pipeline's backbone tokenizer (the
    batcher's unit of work); 413 for a text above ``max_text_wordpieces``.

    A text of at most ``max_text_wordpieces`` characters cannot exceed the
    cap (a wordpiece holds at least one character): its cost is estimated
    from its length, and it is never tokenised here (tokenising every text
    in the request path cost the server 5 % of its time, under the GIL the
    batcher needs). A text of more than 64 characters per allowed wordpiece
    is refused without tokenising it, so the check itself is bounded too."""
    cap = config.max_text_wordpieces
    costs = []
    tokenizer = None
    for i, text in enumerate(texts):
        if len(text) <= cap:
            costs.append(estimate_wordpieces(text))
            continue
        if len(text) > cap * 64:
            raise _too_long(field, offset + i, f"{len(text)} characters", cap)
        tokenizer = tokenizer or _backbone_tokenizer(nlp)
        if tokenizer is None:
            n = estimate_wordpieces(text)
        else:
            with tokenizer() as tok:
                n = len(tok(text, add_special_tokens=False, verbose=False)["input_ids"]) + 2
        if n - 2 > cap:
            raise _too_long(field, offset + i, f"{n - 2} wordpieces", cap)
        costs.append(n)
    return costs


def _too_long(field: str, index: int, size: str, cap: int) -> RequestError:
    return RequestError(
        413, f"{field}[{index}] has {size}; this server takes at most {cap} wordpieces per text "
             "(--max-text-wordpieces). Split the text (e.g. by paragraph) into several texts.",
    )


def _backbone_tokenizer(nlp):
    """The borrow() of the first spacy-ptuning backbone in the pipeline
    (None for pipelines without one)."""
    from ..pipeline.transformer_model import find_adapter_layers

    for _, pipe in nlp.pipeline:
        for _, _, adapter in find_adapter_layers(pipe):
            return adapter.backbone.borrow_tokenizer
    return None


# -- failures ----------------------------------------------------------------

# An absolute POSIX or Windows path (a server's folders are nobody's business).
_PATH = re.compile(r"(?:[A-Za-z]:\\|(?<![\w.])/)(?:[\w.\-@+]+[/\\])+[\w.\-@+]*")


def scrub(text: str) -> str:
    """``text`` without this machine's file system paths: an absolute path
    that exists here, or whose folder does (each becomes ``<path>``). URL
    paths such as ``/adapters/NAME`` stay."""

    def hide(m: "re.Match") -> str:
        path = Path(m.group(0))
        return "<path>" if path.exists() or (path.parent != Path(path.anchor) and path.parent.exists()) else m.group(0)

    return _PATH.sub(hide, text)


def public_message(e: BaseException) -> str:
    """What a client is told of a failure: our numbered message, or the
    exception's type and message; file paths removed either way."""
    text = str(e)
    return scrub(text if text.startswith("[PT-") else f"{type(e).__name__}: {text}")


def status_of(e: BaseException) -> int:
    """The HTTP status of a failure to serve a request."""
    if isinstance(e, RequestError):
        return e.status
    if isinstance(e, UnknownAdapter):
        return 404
    if isinstance(e, InvalidAdapterName):
        return 422
    if isinstance(e, (QueueFull, ShuttingDown)):
        return 503
    return 500


def request_error(e: BaseException) -> RequestError:
    """Any failure to serve a request as a :class:`RequestError`."""
    if isinstance(e, RequestError):
        return e
    headers = {}
    if isinstance(e, QueueFull):
        headers["Retry-After"] = str(e.retry_after)
    elif isinstance(e, ShuttingDown):
        headers["Retry-After"] = "1"
    detail = str(e) if isinstance(e, (QueueFull, ShuttingDown)) else public_message(e)
    return RequestError(status_of(e), detail, headers)


def loads_busy_error(config, e: "LoadsBusy") -> RequestError:
    """The 503 of cold adapters that could not be loaded in time
    (:class:`~spacy_ptuning.serving.load_budget.LoadsBusy`), with a
    Retry-After not sooner than half the admitted backlog takes: the refused
    come back together, and 503s a second cost the warm requests their
    event loop."""
    retry = max(config.retry_after_s, math.ceil(max(e.wait_s - e.limit_s, e.limit_s / 2)))
    return RequestError(
        503, f"The server is busy loading adapters: {e.asked} loads are waiting, about "
        f"{e.wait_s:.0f} s of work (--load-share {config.load_share}, --timeout {config.timeout_s:g}). "
        f"Retry after {retry} s.", headers={"Retry-After": str(retry)})


def pipeline_batcher(config, observer=None, turns=None):
    """The :class:`~spacy_ptuning.batcher.Batcher` of a server or replica:
    texts through :func:`~spacy_ptuning.mixed_batch.run_items` with the
    config's batching, answered as :func:`doc_json`; each batch in its turn
    of ``turns`` (a :class:`~spacy_ptuning.serving.load_budget.LoadBudget`),
    if given."""
    from .batcher import Batcher
    from .mixed_batch import MixedStats, run_items

    def runner(items, stats):
        def run():
            return run_items(items, batching=config.batching, max_batch_tokens=config.max_batch_tokens, stats=stats)

        return run() if turns is None else turns.batch(run)

    return Batcher(config, observer, runner=runner, render=doc_json, describe=public_message,
                   stats_factory=MixedStats)
