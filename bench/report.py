#!/usr/bin/env python
"""Render bench/compare.py runs: the table, targets and learning curves of
one run (compare.py calls render() and plot() at its end), or one markdown
report with PNG plots from several runs (this script).

    python bench/report.py bench/results/project/ner.json bench/results/project/textcat.json \
        --out bench/results/project/report.md

Inputs: compare.py JSON files (folders are searched for *.json written by
compare.py; missing files are skipped with a note, so a report can be made
before every benchmark has run). Output: the markdown file, and beside it per
task ``<stem>_<task>_curve.png`` (dev score against pure training time, all
runs of the task in one plot: e.g. the equal-budget run and a longer one) and
``<stem>_<task>_ratios.png`` (each system's cost relative to (a),
spacy-transformers full fine-tuning).
"""
import sys

from lib.report import main

if __name__ == "__main__":
    sys.exit(main())
