"""Fail early, with a clear message, when a benchmark data file is missing.

    python scripts/check_data.py ../shared/data conll2003/train.iob conll2003/dev.iob \
        --command convert-conll --mkdir corpus/conll

The benchmark data sets are not shipped with this project (they are not ours to
redistribute): they are read in place from the folder given by the project
variable `data_dir`, and never copied into the repository.
"""
import argparse
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path)
    p.add_argument("files", nargs="+", help="paths relative to data_dir that must exist")
    p.add_argument("--command", default="convert-conll", help="project command to name in the error message")
    p.add_argument("--mkdir", type=Path, action="append", default=[], help="output folder(s) to create")
    args = p.parse_args()

    missing = [f for f in args.files if not (args.data_dir / f).is_file()]
    if missing:
        where = args.data_dir.resolve()
        lines = [
            f"Benchmark data not found under data_dir = {args.data_dir} (resolved: {where}).",
            "Missing: " + ", ".join(str(args.data_dir / f) for f in missing),
            "Expected layout: <data_dir>/conll2003/{train,dev}.iob (CoNLL-2003, 'TOKEN POS CHUNK NER'), "
            "<data_dir>/sst2/{train,dev}.tsv (SST-2, 'label<TAB>text' with a header), "
            "<data_dir>/bc5cdr/{train,dev}.iob (BioCreative V CDR, 'TOKEN NER').",
            "The data is not shipped with this project. Point the command at your copy with e.g.",
            f"    python -m spacy project run {args.command} . --vars.data_dir /path/to/data",
            "(relative paths are resolved from the project folder).",
        ]
        print("\n".join(lines), file=sys.stderr)
        sys.exit(1)
    for d in args.mkdir:
        d.mkdir(parents=True, exist_ok=True)
    print(f"Found {len(args.files)} data file(s) under {args.data_dir}")


if __name__ == "__main__":
    main()
