"""Sizing the completion experiment on the real model (model=smollm2, SmolLM2-135M), in one process.

    nice -n 5 python scripts/bench_smollm2.py --decode --steps      # decode s/token at batch 8, 16; one MGS, one PG step
    nice -n 5 python scripts/bench_smollm2.py --population          # population decoding throughput, K = 4, 8, 16
    nice -n 5 python scripts/bench_smollm2.py --continuations       # greedy continuations of the base at 50/100/200/500

One torch thread (the machine's two cores are shared); every part writes one JSON object as its
last line and, with --out FILE, merges it into FILE under its part's key. The model must be
prepared (`python scripts/prepare_smollm2.py`).

--decode   greedy decoding of B AESLC completion prompts (the first data.prefix_tokens = 10 tokens of
           training emails) for exactly --tokens new tokens (min_new_tokens = max_new_tokens, so EOS does
           not shorten a run), B = 8 and 16, --rounds rounds each: seconds per decode step (one new token
           for all B rows) and per generated token.
--steps    one training step of mleps/conf/trainer/mgs.yaml and of pg.yaml as the loop runs it (step,
           clip, optimizer), on --step-batch windows of AESLC (prefix 10, continuation 50 tokens), K = 4,
           decodes capped at --step-tokens; the rule's own timing split is kept (decode, perturb, ...).
--population  P = K+1 parameter sets (θ and K perturbations, σ = 1e-3) decoding B rows each: one batched
           `generate` of P·B rows through mleps.population, against K+1 sequential `generate` calls of B
           rows, against plain batched inference (one model decoding P·B rows, no population), for exactly
           --pop-tokens new tokens, on tiny_marian (random init, its default sizes) and on SmolLM2.
--continuations  the base's greedy continuations of AESLC validation paragraphs (data=completion
           data.sequences=paragraphs: every reference ends with EOS; the first --examples paragraphs, those of
           at most 10 tokens dropped), one decode to 500 new tokens cut at 50, 100, 200, 500: non-termination,
           seq-rep-4 per continuation, mean length in tokens (mleps's task losses), reference perplexity.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def data_dir() -> Path:
    return Path(os.environ.get("MLEPS_DATA_DIR", ROOT / "data"))


def load_smollm2():
    from mleps.pretrained import PREPARE_COMMAND, is_prepared, smollm2_folder
    from mleps.models import from_pretrained

    folder = smollm2_folder()
    if not is_prepared(folder):
        sys.exit(f"error: model=smollm2 is not prepared at {folder}: run {PREPARE_COMMAND}")
    model, tokenizer = from_pretrained(str(folder), False, "causal")
    return model, tokenizer, folder


def completion_cfg(**overrides):
    from omegaconf import OmegaConf

    from mleps.config import DataConfig

    raw = OmegaConf.load(ROOT / "mleps" / "conf" / "data" / "completion.yaml")
    raw.pop("defaults", None)
    raw.train_file = str(data_dir() / "aeslc" / "train.jsonl")
    raw.validation_file = raw.test_file = None
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), raw, overrides)
    return cfg


def training_windows(tokenizer, n: int):
    """The first n AESLC training windows (prefix 10, continuation 50 tokens) as mleps builds them."""
    from mleps.data import completion_pairs, load_split

    cfg = completion_cfg(max_train_examples=max(4 * n, 64))
    return completion_pairs(load_split(cfg, "train"), tokenizer, cfg, "train").select(range(n))


def median_time(fn, rounds: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# ----------------------------------------------------------------------------- decode and steps
def bench_decode(args) -> dict:
    from mleps.families import family_for

    model, tokenizer, _ = load_smollm2()
    model.eval()
    windows = training_windows(tokenizer, max(args.decode_batches))
    result = {"tokens": args.tokens, "rounds": args.rounds}
    for b in args.decode_batches:
        batch = family_for(model).encode_sources(tokenizer, list(windows["source"])[:b], 64)

        def run():
            with torch.no_grad():
                model.generate(**batch, do_sample=False, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                               pad_token_id=tokenizer.pad_token_id)
        med, times = median_time(run, args.rounds)
        result[f"batch_{b}"] = {"s_per_step": med / args.tokens, "s_per_token": med / args.tokens / b,
                                "tokens_per_s": args.tokens * b / med, "runs_s": times}
        log(f"decode batch {b}: {med / args.tokens:.3f} s per step, {args.tokens * b / med:.1f} tokens/s")
    return result


def bench_steps(args) -> dict:
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from mleps.data import Collator
    from mleps.losses import build_task_loss
    from mleps.trainers import RULES, build_rule

    model, tokenizer, _ = load_smollm2()
    windows = training_windows(tokenizer, args.step_batch)
    batch = Collator(tokenizer, model)(windows[:])
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    accelerator = Accelerator(cpu=True)
    result = {"batch": args.step_batch, "k": 4, "max_new_tokens": args.step_tokens}
    for name, metric in (("mgs", "repetition"), ("pg", "repetition")):
        raw = OmegaConf.load(ROOT / "mleps" / "conf" / "trainer" / f"{name}.yaml")
        raw.pop("defaults", None)
        cfg = OmegaConf.merge(OmegaConf.structured(RULES[name].schema), raw,
                              {"num_samples": 4, "max_new_tokens": args.step_tokens, "lr": 1e-5})
        rule = build_rule(name, cfg=cfg, model=model, tokenizer=tokenizer,
                          metric=build_task_loss(metric, "sentence" if name == "pg" else "corpus"),
                          accelerator=accelerator, seed=0, optimizer=optimizer)
        for step in range(args.step_rounds):
            with torch.no_grad():
                torch._foreach_copy_(params, theta)
            optimizer.zero_grad(set_to_none=True)
            model.train()
            t0 = time.perf_counter()
            stats = rule.step(batch, step)
            if rule.clip_in_loop and rule.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, rule.cfg.max_grad_norm)
            rule.apply(optimizer)
            seconds = time.perf_counter() - t0
            timing = {k: float(v) for k, v in stats.items() if k.endswith("_s")}
            log(f"{name} step {step}: {seconds:.1f} s {timing}")
        result[name] = {"step_s": seconds, **timing, "sample_len": float(stats.get("sample_len", 0.0))}
    return result


# ----------------------------------------------------------------------------- population throughput
def tiny_marian_model():
    from omegaconf import OmegaConf

    from mleps.config import ModelConfig
    from transformers import MarianConfig, MarianMTModel

    raw = OmegaConf.load(ROOT / "mleps" / "conf" / "model" / "tiny_marian.yaml")
    raw.pop("defaults", None)
    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
    torch.manual_seed(0)
    # mleps.models.tiny_marian's config, without a trained tokenizer (throughput does not read the weights)
    model = MarianMTModel(MarianConfig(
        vocab_size=m.vocab_size, decoder_vocab_size=m.vocab_size, d_model=m.d_model, encoder_layers=m.layers,
        decoder_layers=m.layers, encoder_attention_heads=m.heads, decoder_attention_heads=m.heads,
        encoder_ffn_dim=m.ffn_dim, decoder_ffn_dim=m.ffn_dim, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, max_position_embeddings=512, scale_embedding=True,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
        decoder_start_token_id=0, forced_eos_token_id=None))
    model.generation_config.max_length = None
    model.generation_config.bad_words_ids = None
    ids = torch.randint(3, m.vocab_size, (64, 16), generator=torch.Generator().manual_seed(1))
    return model.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bench_population(args) -> dict:
    from mleps import population
    from mleps.decoding import generate
    from mleps.families import family_for
    from mleps.search import SearchConfig, apply_perturbation_, draw_samples

    result = {}
    for name in args.pop_models:
        if name == "tiny_marian":
            model, pool = tiny_marian_model()
            rows = args.pop_rows_tiny
        else:
            model, tokenizer, _ = load_smollm2()
            model.eval()
            windows = training_windows(tokenizer, 64)
            pool = family_for(model).encode_sources(tokenizer, list(windows["source"]), 64)
            rows = args.pop_rows_smollm2
        params = [p for p in model.parameters() if p.requires_grad]
        theta = [p.detach().clone() for p in params]
        kw = dict(max_new_tokens=args.pop_tokens)
        model.generation_config.min_new_tokens = args.pop_tokens  # every variant decodes exactly pop_tokens
        result[name] = {"rows_per_group": rows, "tokens": args.pop_tokens, "k": {}}
        for k in args.pop_k:
            size = k + 1
            batch = {key: pool[key][:rows] for key in ("input_ids", "attention_mask")}
            plain = {key: pool[key][:rows].repeat(size, 1) for key in ("input_ids", "attention_mask")}
            search = SearchConfig(num_samples=k, noise_mode="constant", noise_scale=1e-3, proposal="zero")
            stacks = population.stack_parameters(params, size)
            for group, sample in enumerate(draw_samples(search, torch.Generator().manual_seed(k)), start=1):
                apply_perturbation_([s[group] for s in stacks], None, search, sample)

            def batched():
                with torch.no_grad(), population.population(model, dict(zip(params, stacks))):
                    population.decode(model, batch, size, **kw)

            def sequential():
                with torch.no_grad():
                    for group in range(size):
                        torch._foreach_copy_(params, [s[group] for s in stacks])
                        generate(model, batch, **kw)
                    torch._foreach_copy_(params, theta)

            def one_model():
                with torch.no_grad():
                    generate(model, plain, **kw)

            variants = {"batched": batched, "sequential": sequential, "plain": one_model}
            times = {v: [] for v in variants}
            for r in range(args.rounds + 1):  # round 0 warms up; rotating order: load hits all alike
                names = list(variants)[r % 3:] + list(variants)[:r % 3]
                for v in names:
                    t0 = time.perf_counter()
                    variants[v]()
                    if r:
                        times[v].append(time.perf_counter() - t0)
            med = {v: statistics.median(t) for v, t in times.items()}
            tokens = size * rows * args.pop_tokens
            result[name]["k"][k] = {
                **{f"{v}_s": m for v, m in med.items()},
                **{f"{v}_tokens_per_s": tokens / m for v, m in med.items()},
                "batched_over_plain_throughput": med["plain"] / med["batched"],
                "batched_over_sequential_throughput": med["sequential"] / med["batched"],
                "stack_bytes": sum(s.numel() * s.element_size() for s in stacks)}
            log(f"{name} K={k}: " + ", ".join(f"{v} {m:.2f}s" for v, m in med.items()))
            del stacks
    return result


# ----------------------------------------------------------------------------- continuations
def bench_continuations(args) -> dict:
    """One greedy decode of the paragraphs' prompts to the largest limit, cut at each limit: a greedy row's
    first L tokens do not depend on max_new_tokens (a limit only stops the loop), so the cut rows are what a
    decode with max_new_tokens=L returns. Scored with mleps's own task losses (seq_rep: seq-rep-4 per
    continuation, averaged; nontermination) and reference cross-entropy, as mleps.evaluate scores them."""
    from mleps.data import Collator, completion_pairs, load_split
    from mleps.decoding import decoded_batch, eos_ids, generate
    from mleps.evaluation import reference_cross_entropy
    from mleps.families import family_for
    from mleps.losses import build_task_loss

    model, tokenizer, _ = load_smollm2()
    model.eval()
    cfg = completion_cfg(sequences="paragraphs", validation_file=str(data_dir() / "aeslc" / "validation.jsonl"),
                         max_eval_examples=args.examples)
    rows = completion_pairs(load_split(cfg, "validation"), tokenizer, cfg, "validation")
    prompts = family_for(model).encode_sources(tokenizer, list(rows["source"]), cfg.max_source_length)
    references = [list(r) for r in rows["references"]]
    t0 = time.perf_counter()
    ids = generate(model, prompts, max_new_tokens=max(args.limits))
    decode_s = time.perf_counter() - t0
    ce_sum, tokens = reference_cross_entropy(model, rows, Collator(tokenizer, model), 8)
    losses = {name: build_task_loss(name, "corpus") for name in ("seq_rep", "nontermination")}
    result = {"examples": len(rows), "split": "validation", "sequences": "paragraphs", "decode_rows": len(rows),
              "decode_s": decode_s, "decoded_steps": ids.shape[1] - 1,
              "reference_cross_entropy": ce_sum / tokens, "reference_perplexity": float(np.exp(ce_sum / tokens)),
              "limits": {}}
    for limit in args.limits:
        decoded = decoded_batch(ids[:, :1 + limit], tokenizer, eos_ids(model), references, batch=prompts)
        lengths = [len(t) for t in decoded.token_ids]
        result["limits"][limit] = {
            **{("seq_rep_4" if n == "seq_rep" else n): loss.score_from_stats(loss.stats(decoded))
               for n, loss in losses.items()},
            "mean_tokens": statistics.mean(lengths), "ended": sum(decoded.ended_with_eos)}
        log(f"limit {limit}: {result['limits'][limit]}")
    longest = decoded_batch(ids, tokenizer, eos_ids(model), references, batch=prompts)
    result["examples_text"] = [{"prompt": p, "continuation": c[:600]}
                               for p, c in list(zip(rows["source"], longest.texts))[:3]]
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode", action="store_true")
    p.add_argument("--steps", action="store_true")
    p.add_argument("--population", action="store_true")
    p.add_argument("--continuations", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after one warm-up (--decode, --population)")
    p.add_argument("--tokens", type=int, default=32, help="--decode: new tokens per run")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--step-tokens", type=int, default=32)
    p.add_argument("--step-rounds", type=int, default=2, help="--steps: steps per rule (the last is reported)")
    p.add_argument("--pop-models", nargs="+", default=["tiny_marian", "smollm2"])
    p.add_argument("--pop-k", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--pop-tokens", type=int, default=16)
    p.add_argument("--pop-rows-tiny", type=int, default=8)
    p.add_argument("--pop-rows-smollm2", type=int, default=1)
    p.add_argument("--examples", type=int, default=16, help="--continuations: validation paragraphs (before the "
                                                             "drop of those of at most 10 tokens)")
    p.add_argument("--limits", type=int, nargs="+", default=[50, 100, 200, 500])
    p.add_argument("--out", type=Path, default=None, help="merge the results into this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging

    import datasets
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    parts = {"decode": bench_decode, "steps": bench_steps, "population": bench_population,
             "continuations": bench_continuations}
    result = {"threads": args.threads, "loadavg_start": os.getloadavg()}
    for name, fn in parts.items():
        if getattr(args, name):
            result[name] = fn(args)
    result["loadavg_end"] = os.getloadavg()
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.is_file() else {}
        old.update({k: v for k, v in result.items() if k in parts})
        old.setdefault("runs", []).append({"argv": sys.argv[1:] if argv is None else argv,
                                           **{k: result[k] for k in ("threads", "loadavg_start", "loadavg_end")}})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(old, indent=1, default=float) + "\n")
    print(json.dumps(result, default=float), flush=True)
    return result


if __name__ == "__main__":
    main()
