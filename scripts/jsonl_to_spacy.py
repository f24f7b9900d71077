"""Convert an NER JSONL file ({"text", "entities": [[start, end, label], ...]})
into a spaCy DocBin (.spacy) for `spacy train`.

    python scripts/jsonl_to_spacy.py assets/demo_ner_train.jsonl corpus/demo/train.spacy
"""
import argparse
import json
import sys
from pathlib import Path

import spacy
from spacy.tokens import DocBin


def convert(input_path: Path, output_path: Path, lang: str = "en") -> None:
    nlp = spacy.blank(lang)
    db = DocBin(store_user_data=False)
    n_docs = n_ents = 0
    with Path(input_path).open(encoding="utf8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            doc = nlp.make_doc(rec["text"])
            spans = []
            for start, end, label in rec.get("entities", []):
                span = doc.char_span(start, end, label=label)
                if span is None:
                    sys.exit(
                        f"{input_path}:{line_no}: entity {rec['text'][start:end]!r} "
                        f"({start}-{end}) does not align to token boundaries"
                    )
                spans.append(span)
            doc.ents = spans
            db.add(doc)
            n_docs += 1
            n_ents += len(spans)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    db.to_disk(output_path)
    print(f"{input_path} -> {output_path}: {n_docs} docs, {n_ents} entities")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--lang", default="en")
    args = p.parse_args()
    if not args.input.exists():
        sys.exit(f"Input file not found: {args.input}")
    convert(args.input, args.output, args.lang)


if __name__ == "__main__":
    main()
