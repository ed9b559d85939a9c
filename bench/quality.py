"""The quality study as a script: `python bench/quality.py --output-dir docs/study` is the same as
`spt-fast study --output-dir docs/study` (see spt_fast/evaluation/study.py for what it runs and writes)."""
import sys

from spt_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
