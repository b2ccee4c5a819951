"""python -m mleps.evaluate checkpoint=PATH [data=NAME] [split=test] [decode.num_beams=4 ...]

Decodes a split with a saved checkpoint, writes the predictions (one per line, dataset order)
(per_example=true: also <predictions stem>.per_example.jsonl, one object per output with its token
count, whether it ended with EOS and each sentence-form metric's loss) and prints, as its last line,
one JSON object: metric, score, loss, n, the metric's own fields
(for BLEU: bleu and sacrebleu's signature), one score per `eval.metrics` entry, the references'
cross_entropy and perplexity, and the predictions path.

A checkpoint written by mleps.train remembers its data, metric and eval.metrics: without `data=`
(or `metric=`, `eval.metrics=`) on the command line they are the training run's, with any
`data.*` / `metric.*` overrides applied on top; evaluation sizes (data.max_eval_examples) stay
evaluate's own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from mleps.config import CONF_DIR, conf_dir, register_configs
from mleps.errors import UserError, exit_on_user_error, run_hydra

log = logging.getLogger("mleps")
register_configs()


def default_predictions_name(data_cfg, split: str, settings: dict | None = None) -> str:
    """predictions-<data>-<split>-<file stem>-<hash>.txt. The hash covers the data file's path (two local
    test files, even two test.jsonl in different folders, never write over each other's predictions;
    data.dataset: the dataset's name and its split (slice) instead of the file) and `settings`: everything
    else that changes what is written (decode settings, metric, eval.metrics, data options, source prefix,
    seed), so an evaluation with other settings never replaces an earlier one's file."""
    from mleps.data import data_path, uses_dataset

    if uses_dataset(data_cfg):
        folder = data_path(data_cfg.dataset)
        where = str(folder.resolve()) if folder.is_dir() else data_cfg.dataset
        source = [where, data_cfg.get("dataset_config"), data_cfg[f"{split}_split"]]
        stem = re.sub(r"[^\w.-]+", "_", f"{Path(data_cfg.dataset).name}-{data_cfg[f'{split}_split']}").strip("_")
    else:
        file = data_path(data_cfg[f"{split}_file"]).resolve()  # one name for one file, whatever links lead to it
        source, stem = str(file), file.stem
    key = str(source) if settings is None else json.dumps([str(source), settings], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"predictions-{data_cfg.name}-{split}-{stem}-{digest}.txt"


def output_settings(cfg, prefix: str) -> dict:
    """What changes the predictions or the per-example losses besides the checkpoint and the data file."""
    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    data = {k: v for k, v in plain(cfg.data).items() if not k.endswith(("_file", "_split"))}  # the source says those
    return {"decode": plain(cfg.decode), "metric": plain(cfg.metric), "eval_metrics": plain(cfg.eval.metrics),
            "data": data, "source_prefix": prefix, "seed": cfg.seed}


# A run dir's own files, which predictions must never replace.
RUN_DIR_FILES = ("metrics.jsonl", "config.yaml", "summary.json")


def is_checkpoint_folder(folder: Path) -> bool:
    """mleps' own checkpoint, or a Hugging Face model folder (a config beside weights or an adapter)."""
    if not folder.is_dir():
        return False
    if (folder / "mleps.json").exists() or (folder / "trainer_state.json").exists():
        return True
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or (folder / "adapter_config.json").exists()
    return weights and ((folder / "config.json").exists() or (folder / "adapter_config.json").exists())


def check_predictions_path(out: Path, checkpoint: Path, given: str) -> None:
    """Refuse a predictions= path that would write over a checkpoint's or a run's files: a checkpoint
    folder is replaced only as a whole by mleps.train, and any name inside it could be one of its files."""
    checkpoint = checkpoint.resolve()
    target = out.resolve()
    for folder in (target, *target.parents):
        if folder == checkpoint or is_checkpoint_folder(folder):
            raise UserError(f"predictions={given} is inside the checkpoint folder {folder}: evaluate never writes "
                            f"into a checkpoint (it could replace the weights): pass a path outside it, e.g. "
                            f"predictions={folder.parent / 'predictions.txt'}")
        if folder.name.startswith(".") and (".tmp-" in folder.name or folder.name.endswith(".old")):
            raise UserError(f"predictions={given} is inside {folder}, a checkpoint being written or kept aside: "
                            f"pass a path outside it")
    if target.is_dir():
        raise UserError(f"predictions={given} is a folder: pass a file path, e.g. predictions={target / 'predictions.txt'}")
    if target.name in RUN_DIR_FILES and (target.parent / "checkpoints").is_dir():
        raise UserError(f"predictions={given} is a file of the run in {target.parent}: pass another file name")


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside, then rename: a failed write leaves neither a half-written file nor a stray temporary one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise UserError(f"cannot write {path}: {e.strerror or e}: pass predictions=A_WRITABLE_FILE") from None


def adopt_checkpoint_config(cfg, meta: dict, overrides: list[str]) -> None:
    """The checkpoint's data / metric / eval.metrics where the command line names none (see above)."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    for group in ("data", "metric"):
        stored = meta.get(f"{group}_config")
        if stored is None or group in keys:
            continue
        if group == "data":  # how much to evaluate is this command's choice, not the training run's
            stored = dict(stored, max_eval_examples=cfg.data.max_eval_examples)
        dotted = OmegaConf.from_dotlist([o.lstrip("+") for o, k in zip(overrides, keys) if k.startswith(group + ".")])
        cfg[group] = OmegaConf.merge(cfg[group], stored, dotted.get(group, {}))
    if "eval.metrics" not in keys and "eval" not in keys and meta.get("eval_metrics"):
        cfg.eval.metrics = meta["eval_metrics"]


def evaluate_checkpoint(cfg, overrides: list[str] | None = None) -> dict:
    """`overrides`: the command line's, to adopt the checkpoint's own config (None: use cfg as it is)."""
    from mleps.data import Collator, completion_pairs, data_path, load_split, tokenize
    from mleps.families import family_for
    from mleps.validate import check_family_options, check_tokenizer_files
    from mleps.evaluation import evaluate_split
    from mleps.metrics_config import eval_metrics_from_config, metric_from_config
    from mleps.models import load_checkpoint

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise UserError("no checkpoint given: pass checkpoint=RUN/checkpoints/last (a folder written by mleps.train)")
    if cfg.predictions:  # before any work: a refused path costs nothing
        check_predictions_path(data_path(cfg.predictions), data_path(cfg.checkpoint), cfg.predictions)
    check_tokenizer_files(cfg.checkpoint, "checkpoint")
    torch.manual_seed(cfg.seed)
    model, tokenizer, meta = load_checkpoint(cfg.checkpoint)
    if overrides is not None:
        adopt_checkpoint_config(cfg, meta, overrides)
    metrics = [metric_from_config(cfg.metric, level="corpus"), *eval_metrics_from_config(cfg.metric, cfg.eval.metrics)]
    for m in metrics:  # lm without metric.score_model scores with the evaluated model itself
        m.bind(model, tokenizer)
    metric = metrics[0]
    check_family_options(cfg.data, family_for(model).name)
    ds = load_split(cfg.data, cfg.split)
    if cfg.data.get("task", "pairs") == "completion":
        ds = completion_pairs(ds, tokenizer, cfg.data, cfg.split)
    prefix = cfg.source_prefix if cfg.source_prefix is not None else meta.get("source_prefix", "")
    per_example = [] if cfg.per_example else None
    hyps, result = evaluate_split(model, tokenizer, ds, tokenize(ds, tokenizer, cfg.data, prefix),
                                  Collator(tokenizer, model, cfg.data.get("loss_on")), cfg.decode, metrics,
                                  per_example=per_example, source_prefix=prefix,
                                  max_source_length=cfg.data.max_source_length, progress=cfg.progress,
                                  desc=f"decode {cfg.split}")
    out = data_path(cfg.predictions) if cfg.predictions else \
        data_path(cfg.checkpoint) / default_predictions_name(cfg.data, cfg.split, output_settings(cfg, prefix))
    write_text_atomic(out, "".join(h.replace("\n", " ") + "\n" for h in hyps))
    extra = {}
    if per_example is not None:  # one JSON object per output, dataset order (paired tests between checkpoints)
        rows_path = out.with_name(out.stem + ".per_example.jsonl")
        write_text_atomic(rows_path, "".join(json.dumps(r) + "\n" for r in per_example))
        extra["per_example"] = str(rows_path)
    return {"metric": metric.name, **result, "n": len(hyps), "split": cfg.split, "data": cfg.data.name,
            "checkpoint": str(data_path(cfg.checkpoint)), "predictions": str(out), **extra}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
@exit_on_user_error
def evaluate(cfg) -> None:
    print(json.dumps(evaluate_checkpoint(cfg, list(HydraConfig.get().overrides.task))))


def main() -> None:
    exit_on_user_error(conf_dir)("evaluate")
    run_hydra(evaluate)


if __name__ == "__main__":
    main()
