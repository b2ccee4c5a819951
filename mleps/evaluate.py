"""python -m mleps.evaluate checkpoint=PATH [data=NAME] [split=test] [decode.num_beams=4 ...]

Decodes a split with a saved checkpoint, writes the predictions (one per line, dataset order)
and prints, as its last line, one JSON object: metric, score, n, the metric's own fields
(for BLEU: bleu and sacrebleu's signature) and the predictions path.
"""
from __future__ import annotations

import hashlib
import json
import logging

import hydra
import torch
from omegaconf import OmegaConf

from mleps.config import register_configs
from mleps.errors import UserError, exit_on_user_error, run_hydra

log = logging.getLogger("mleps")
register_configs()


def default_predictions_name(data_cfg, split: str) -> str:
    """predictions-<data>-<split>-<file stem>-<hash of its path>.txt: two local test files (even two
    test.jsonl in different folders) never write over each other's predictions."""
    from mleps.data import data_path

    file = data_path(data_cfg[f"{split}_file"])
    digest = hashlib.sha256(str(file).encode()).hexdigest()[:8]
    return f"predictions-{data_cfg.name}-{split}-{file.stem}-{digest}.txt"


def evaluate_checkpoint(cfg) -> dict:
    from mleps.data import data_path, load_split
    from mleps.decoding import translate
    from mleps.metrics_config import metric_from_config
    from mleps.models import load_checkpoint

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise UserError("no checkpoint given: pass checkpoint=RUN/checkpoints/last (a folder written by mleps.train)")
    torch.manual_seed(cfg.seed)
    metric = metric_from_config(cfg.metric, level="corpus")
    model, tokenizer, meta = load_checkpoint(cfg.checkpoint)
    ds = load_split(cfg.data, cfg.split)
    prefix = cfg.source_prefix if cfg.source_prefix is not None else meta.get("source_prefix", "")
    hyps = translate(model, tokenizer, ds["source"], cfg.decode, source_prefix=prefix,
                     max_source_length=cfg.data.max_source_length, progress=cfg.progress, desc=f"decode {cfg.split}")
    result = metric.corpus_score(hyps, ds["references"])
    out = data_path(cfg.predictions) if cfg.predictions else \
        data_path(cfg.checkpoint) / default_predictions_name(cfg.data, cfg.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(h.replace("\n", " ") + "\n" for h in hyps), encoding="utf-8")
    tmp.replace(out)
    return {"metric": metric.name, **result, "n": len(hyps), "split": cfg.split, "data": cfg.data.name,
            "checkpoint": str(data_path(cfg.checkpoint)), "predictions": str(out)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@exit_on_user_error
def evaluate(cfg) -> None:
    print(json.dumps(evaluate_checkpoint(cfg)))


def main() -> None:
    run_hydra(evaluate)


if __name__ == "__main__":
    main()
