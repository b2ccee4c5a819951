"""Export WikiText-103 (raw) from the Hugging Face hub as one article per JSONL line, for
mleps/conf/data/wikitext103.yaml. Needs the internet (not run on the project's offline machine).

    python scripts/export_wikitext103.py [--out data/wikitext103] [--config wikitext-103-raw-v1]

The hub's rows are lines; an article starts at a level-1 heading " = Title = " (level 2 and
deeper are " = = Section = = "). Each article's lines are joined with newlines, empty lines
dropped, headings kept as text.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

TITLE = re.compile(r"^ = [^=].* = $")  # " = Valkyria Chronicles III = ", not " = = Gameplay = = "


def articles(lines):
    """Group the hub's lines into articles (each a str), in order."""
    current: list[str] = []
    for line in lines:
        line = line.rstrip("\n")
        if TITLE.match(line) and current:
            yield "\n".join(current)
            current = []
        if line.strip():
            current.append(line.strip())
    if current:
        yield "\n".join(current)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/wikitext103")
    p.add_argument("--config", default="wikitext-103-raw-v1")
    args = p.parse_args(argv)
    import datasets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = datasets.load_dataset("Salesforce/wikitext", args.config, split=split)
        tmp = out / f"{split}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            n = 0
            for n, text in enumerate(articles(rows["text"]), 1):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        os.replace(tmp, out / f"{split}.jsonl")  # never a half-written split
        print(f"{split}: {n} articles -> {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
