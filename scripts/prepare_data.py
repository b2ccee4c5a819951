"""make data: fill data/ with <name>/{train,validation,test}.jsonl for multi30k and aeslc.

Links ../shared/datasets/<name> when it exists beside the checkout; otherwise downloads the
public copies from the Hugging Face hub with `datasets` and writes the same layout.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HUB = {"multi30k": "bentrevett/multi30k", "aeslc": "aeslc"}
SPLITS = ("train", "validation", "test")


def main() -> int:
    data_dir = Path(os.environ.get("MLEPS_DATA_DIR", ROOT / "data"))
    shared = ROOT.parent / "shared" / "datasets"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, hub_name in HUB.items():
        target = data_dir / name
        if all((target / f"{s}.jsonl").is_file() for s in SPLITS):
            print(f"data: {target} is ready")
            continue
        if (shared / name).is_dir():
            if target.is_symlink():  # a stale link
                target.unlink()
            target.symlink_to((shared / name).resolve(), target_is_directory=True)
            print(f"data: linked {target} -> {shared / name}")
            continue
        download(hub_name, target)
    return 0


def download(hub_name: str, target: Path) -> None:
    import datasets

    print(f"data: downloading {hub_name} from the Hugging Face hub into {target}")
    try:
        splits = datasets.load_dataset(hub_name)
    except Exception as e:
        sys.exit(f"error: could not download {hub_name} ({type(e).__name__}); "
                 f"put the JSONL files in {target} or set MLEPS_DATA_DIR")
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in splits[split]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(target)


if __name__ == "__main__":
    sys.exit(main())
