"""Convert SST-2 TSV files into spaCy DocBins for textcat training.

    python scripts/convert_sst2.py ../shared/data/sst2/train.tsv corpus/sst2/train.spacy --limit 5000

Input: tab-separated, one header line (`label<TAB>sentence` in train.tsv,
`label<TAB>content` in dev.tsv: the text column is whichever is not `label`),
label 1 = positive, 0 = negative. Output docs carry
cats = {"POSITIVE": 1.0/0.0, "NEGATIVE": 0.0/1.0}. The data is read in place,
never copied into the repository.
"""
import argparse
import random
import sys
from pathlib import Path

import spacy
from spacy.tokens import DocBin

LABELS = {"1": "POSITIVE", "0": "NEGATIVE"}


def read_tsv(path: Path):
    with path.open(encoding="utf8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if "label" not in header or len(header) != 2:
            sys.exit(f"{path}: expected a two-column header with 'label', got {header!r}")
        label_col = header.index("label")
        text_col = 1 - label_col
        for line_no, line in enumerate(f, 2):
            line = line.rstrip("\n")
            if not line:
                continue
            cols = line.split("\t")
            if len(cols) != 2 or cols[label_col] not in LABELS:
                sys.exit(f"{path}:{line_no}: cannot parse row {line!r}")
            yield cols[text_col], LABELS[cols[label_col]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="SST-2 train.tsv or dev.tsv")
    p.add_argument("output", type=Path, help="output .spacy file")
    p.add_argument("--limit", type=int, default=0, help="keep at most this many rows (0 = all)")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="shuffle rows with this seed before applying --limit (default: keep file order)")
    p.add_argument("--lang", default="en")
    args = p.parse_args()

    if not args.input.is_file():
        sys.exit(
            f"SST-2 file not found: {args.input}\n"
            "The data is not shipped with this project; pass its folder with "
            "`python -m spacy project run convert-sst2 . --vars.data_dir /path/to/data` "
            "(expects <data_dir>/sst2/train.tsv and dev.tsv)."
        )
    rows = list(read_tsv(args.input))
    if args.shuffle_seed is not None:
        random.Random(args.shuffle_seed).shuffle(rows)
    if args.limit > 0:
        rows = rows[: args.limit]

    nlp = spacy.blank(args.lang)
    db = DocBin(store_user_data=False)
    counts = {"POSITIVE": 0, "NEGATIVE": 0}
    for doc, label in zip(nlp.tokenizer.pipe(text for text, _ in rows), (l for _, l in rows)):
        doc.cats = {name: float(name == label) for name in LABELS.values()}
        counts[label] += 1
        db.add(doc)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    db.to_disk(args.output)
    print(f"{args.input} -> {args.output}: {len(rows)} docs "
          f"({counts['POSITIVE']} positive, {counts['NEGATIVE']} negative)")


if __name__ == "__main__":
    main()
