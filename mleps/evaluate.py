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

from mleps.config import register_configs
from mleps.errors import UserError, exit_on_user_error, run_hydra

log = logging.getLogger("mleps")
register_configs()


def default_predictions_name(data_cfg, split: str) -> str:
    """predictions-<data>-<split>-<file stem>-<hash of its path>.txt: two local test files (even two
    test.jsonl in different folders) never write over each other's predictions. data.dataset: the
    dataset's name and its split (slice) instead of the file."""
    from mleps.data import data_path, uses_dataset

    if uses_dataset(data_cfg):
        folder = data_path(data_cfg.dataset)
        where = str(folder.resolve()) if folder.is_dir() else data_cfg.dataset
        source = [where, data_cfg.get("dataset_config"), data_cfg[f"{split}_split"]]
        stem = re.sub(r"[^\w.-]+", "_", f"{Path(data_cfg.dataset).name}-{data_cfg[f'{split}_split']}").strip("_")
    else:
        file = data_path(data_cfg[f"{split}_file"]).resolve()  # one name for one file, whatever links lead to it
        source, stem = str(file), file.stem
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    return f"predictions-{data_cfg.name}-{split}-{stem}-{digest}.txt"


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
    from mleps.validate import check_family_options
    from mleps.evaluation import decode_and_score, metric_report, reference_cross_entropy
    from mleps.metrics_config import eval_metrics_from_config, metric_from_config
    from mleps.models import load_checkpoint

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise UserError("no checkpoint given: pass checkpoint=RUN/checkpoints/last (a folder written by mleps.train)")
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
    hyps, stats = decode_and_score(model, tokenizer, ds["source"], ds["references"], cfg.decode, metrics,
                                   per_example=per_example, source_prefix=prefix,
                                   max_source_length=cfg.data.max_source_length, progress=cfg.progress,
                                   desc=f"decode {cfg.split}")
    cross_entropy = reference_cross_entropy(model, tokenize(ds, tokenizer, cfg.data, prefix),
                                            Collator(tokenizer, model, cfg.data.get("loss_on")), cfg.decode.batch_size)
    result = metric_report(metrics, stats, hyps, ds["references"], *cross_entropy)
    out = data_path(cfg.predictions) if cfg.predictions else \
        data_path(cfg.checkpoint) / default_predictions_name(cfg.data, cfg.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(h.replace("\n", " ") + "\n" for h in hyps), encoding="utf-8")
    tmp.replace(out)
    extra = {}
    if per_example is not None:  # one JSON object per output, dataset order (paired tests between checkpoints)
        rows_path = out.with_name(out.stem + ".per_example.jsonl")
        tmp = rows_path.with_name(rows_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in per_example), encoding="utf-8")
        tmp.replace(rows_path)
        extra["per_example"] = str(rows_path)
    return {"metric": metric.name, **result, "n": len(hyps), "split": cfg.split, "data": cfg.data.name,
            "checkpoint": str(data_path(cfg.checkpoint)), "predictions": str(out), **extra}


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@exit_on_user_error
def evaluate(cfg) -> None:
    print(json.dumps(evaluate_checkpoint(cfg, list(HydraConfig.get().overrides.task))))


def main() -> None:
    run_hydra(evaluate)


if __name__ == "__main__":
    main()
