"""The reproduction's numbers, from its finished runs: aggregation, significance, verdict, report.

collect(reproduction)  -> one dict of every number (the JSON)
write_report(results)  -> docs/results.md, the plots, the JSON and a CSV (one row per run)

Significance is sacrebleu's paired bootstrap (1,000 resamples, its fixed seed 12345) on the
greedy test predictions, per seed: each arm against continued MLE, MGS against every other
arm (MGS-blind included), GRPO against PG. The verdict is written from these numbers, never by hand.
The report leaves MGS out of a run without its controls (reportable); the JSON keeps every run, and
`python -m mleps_lab.reproduce_report JSON --results-md MD --img-dir DIR` renders a report again from it.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import subprocess
from pathlib import Path

from mleps.rundir import read_events
from mleps_lab.runs import ROOT, shown, training_step_s, write_json_atomic

DIAGNOSTICS = ("ess", "guided_weight", "best_improvement", "loss_minus_perturbed_mean")
# trainer.diagnose_every's held-out statistics (mleps_lab/mgs_summary.py), reported where an arm logged them
HELD_OUT = {"rank_corr": "diag_rank_correlation", "taken_minus_blind": "diag_taken_minus_blind"}
ALPHA = 0.05  # significance level of the verdict


# -- small pure helpers (unit-tested on hand-made numbers) ------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def paired_bootstrap(baseline: tuple[str, list[str]], systems: list[tuple[str, list[str]]],
                     references: list[list[str]], metrics: tuple[str, ...] = ("bleu", "chrf"),
                     n_samples: int = 1000) -> dict[str, dict[str, dict]]:
    """sacrebleu's paired bootstrap of each system against the baseline.

    Returns {system: {metric: {"score", "baseline", "delta", "p"}}}; p is sacrebleu's (the share
    of resamples whose |difference| exceeds the observed one once centred), so it is two-sided.
    """
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    from mleps.metrics import reference_streams

    objects = {"bleu": BLEU(), "chrf": CHRF()}
    test = PairedTest([baseline, *systems], {m: objects[m] for m in metrics}, reference_streams(references),
                      test_type="bs", n_samples=n_samples)
    _, scores = test()
    names = [k for k in scores if k != "System"]  # sacrebleu's names (BLEU, chrF2), in `metrics` order
    out = {}
    for i, (name, hyps) in enumerate(systems, start=1):
        out[name] = {}
        for metric, key in zip(metrics, names):
            base, result = scores[key][0], scores[key][i]
            # sacrebleu gives identical outputs p = 1/(n+1) (no resample beats a zero difference); two arms
            # whose best checkpoint is the same (e.g. the base itself) are not different: p = 1.
            p = 1.0 if list(hyps) == list(baseline[1]) else result.p_value
            out[name][metric] = {"score": result.score, "baseline": base.score,
                                 "delta": result.score - base.score, "p": p}
    return out


def fmt(mean: float, std: float | None = None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(header: list[str], rows: list[list]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def compare_sentence(a: str, b: str, deltas: list[float], ps: list[float], metric: str, digits: int = 2) -> str:
    """One sentence: does `a` beat `b`, from the per-seed differences and p-values."""
    mean = sum(deltas) / len(deltas)
    significant = [p < ALPHA and (d > 0) == (mean > 0) and d != 0 for d, p in zip(deltas, ps)]
    ps_text = ", ".join(f"{p:.3f}" for p in ps)
    if all(significant):
        verb = "beats" if mean > 0 else "is beaten by"
        how = f"significantly in all {len(ps)} seeds"
    elif any(significant):
        verb = "is ahead of" if mean > 0 else "is behind"
        how = f"significantly in {sum(significant)} of {len(ps)} seeds only"
    else:
        verb = "is not distinguishable from"
        how = f"no seed significant at p < {ALPHA}"
    return f"{a} {verb} {b} on test {metric}: mean Δ {mean:+.{digits}f} ({how}; p per seed: {ps_text})."


# Per-output quantities of evaluate's per_example=true rows (None: the output does not count, e.g. seq-rep-4
# of an output shorter than 4 tokens, which the paper's average leaves out)
PER_EXAMPLE = {
    "task_loss": lambda row: row["lm"],
    "seq_rep": lambda row: row["seq_rep"] if row["tokens"] >= 4 else None,
    "nontermination": lambda row: 0.0 if row["ended"] else 1.0,
}


def paired_bootstrap_rows(a: list, b: list, n_samples: int = 1000, seed: int = 12345) -> dict:
    """Paired bootstrap over examples of mean(a) - mean(b) (None values left out of their system's mean):
    {"delta", "p", "ci95"}. p is two-sided, sacrebleu's form: (1 + #|resampled Δ - mean resampled Δ| >= |Δ|)
    / (n + 1)."""
    import warnings

    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired rows differ in length ({len(a)} and {len(b)}): the same test rows are needed")
    x = np.array([np.nan if v is None else v for v in a], dtype=float)
    y = np.array([np.nan if v is None else v for v in b], dtype=float)
    delta = float(np.nanmean(x) - np.nanmean(y))
    if np.array_equal(x, y, equal_nan=True):
        return {"delta": 0.0, "p": 1.0, "ci95": [0.0, 0.0]}
    index = np.random.default_rng(seed).integers(0, len(x), size=(n_samples, len(x)))
    with warnings.catch_warnings():  # a resample with no counted output on one side: its Δ is NaN, dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        resampled = np.nanmean(x[index], axis=1) - np.nanmean(y[index], axis=1)
    resampled = resampled[np.isfinite(resampled)]
    p = (1 + int((np.abs(resampled - resampled.mean()) >= abs(delta)).sum())) / (len(resampled) + 1)
    return {"delta": delta, "p": p, "ci95": [float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))]}


def paired_tests(rows: list[dict], baselines: tuple = ("mle", "mgs_blind")) -> dict:
    """budget -> seed -> "arm vs baseline" -> quantity -> paired_bootstrap_rows, on the greedy test rows
    (evaluate per_example=true) of the same seed; every arm against each baseline."""
    by = {}
    for r in rows:
        path = r["test"].get("greedy", {}).get("per_example")
        if path:
            per_row = [json.loads(line) for line in Path(path).read_text().splitlines()]
            by.setdefault(r["budget"], {}).setdefault(r["seed"], {})[r["arm"]] = per_row
    out = {}
    for b, seeds in by.items():
        for seed, arms in seeds.items():
            pairs = {}
            for baseline in baselines:
                for arm in arms:
                    if arm == baseline or baseline not in arms or f"{baseline} vs {arm}" in pairs:
                        continue
                    pairs[f"{arm} vs {baseline}"] = {
                        key: paired_bootstrap_rows([f(x) for x in arms[arm]], [f(x) for x in arms[baseline]])
                        for key, f in PER_EXAMPLE.items()}
            out.setdefault(b, {})[str(seed)] = pairs
    return out


# -- collecting the numbers from the runs -------------------------------------------------------
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_row(run_dir: Path, higher_is_better: bool = True) -> dict:
    train = read_events(run_dir, "train")
    val = read_events(run_dir, "validation")
    best = (max if higher_is_better else min)(val, key=lambda e: e["score"])
    diag = {}
    if train and "ess" in train[-1]:
        for key in DIAGNOSTICS[:3]:
            diag[key] = sum(e[key] for e in train) / len(train)
        diag["loss_minus_perturbed_mean"] = sum(e["task_loss"] - e["perturbed_loss_mean"] for e in train) / len(train)
        if "loss_spread_std" in train[-1]:
            diag["loss_spread_std"] = sum(e["loss_spread_std"] for e in train) / len(train)
        diag["num_samples"] = _config(run_dir).get("trainer", {}).get("num_samples")
        for key, logged in HELD_OUT.items():  # trainer.diagnose_every: only the steps that ran it
            values = [e[logged] for e in train if e.get(logged) is not None]
            if values:
                diag[key] = sum(values) / len(values)
    timed = [training_step_s(e) for e in train if e["step"] > 1] or [training_step_s(e) for e in train]
    return {"run_dir": str(run_dir), "steps": train[-1]["step"] if train else 0,
            "train_s": train[-1]["train_s"] if train else 0.0, "s_per_step": sum(timed) / max(len(timed), 1),
            "val_best": best["score"], "val_best_step": best["step"],
            "curve": [[e["step"], e["train_s"], e["score"]] for e in val], "diagnostics": diag}


def recorded_command(run_dir: Path) -> str:
    """The overrides Hydra saved for the run's last invocation (the driver trains with mleps_lab.train)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    return shown(["mleps_lab.train", *OmegaConf.load(path)]) if path.is_file() else "(unknown)"


def _config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def collect(repro, commands: dict) -> dict:
    task, budget = repro.task, repro.budget
    lr = repro.best_lr()
    results = {
        "task": task.name, "budget": budget.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
        "test_keys": task.test_keys, "from_scratch": task.from_scratch, "commit": git_commit(),
        "date": datetime.date.today().isoformat(), "seeds": repro.seeds, "train_s": budget.train_s,
        "notes": budget.notes, "out": str(repro.out),
        "decodes": [] if task.from_scratch else list(repro.decodes()),
        "calibration": {"steps": budget.calibration_steps, "rounds": budget.calibration_rounds,
                        "step_s": repro.step_seconds(), "arm_steps": repro.arm_steps()},
        "lr_search": {"scores": {f"{k:g}": v for k, v in repro.lr_scores().items()}, "chosen": lr}
        if lr is not None else None,
        "commands": commands,
        "stage_s": repro.stage_seconds(),
    }
    if not task.from_scratch and repro.given_base is None:  # as it was run (it may predate this driver)
        results["commands"]["base"] = [recorded_command(repro.base_dir)]
    tests = {}
    for label in repro.tested():
        tests[label] = {d: json.loads(repro.test_file(label, d).read_text()) for d in repro.decodes()}
    if not task.from_scratch:
        base_val = read_events(repro.base_dir, "validation") if repro.given_base is None else []
        summary = repro.base_dir / "summary.json"
        stopped = json.loads(summary.read_text())["phases"][-1].get("early_stop_step") if summary.is_file() else None
        key = "cross_entropy" if task.base_select == "cross_entropy" else "score"
        pick = max if task.higher_is_better and key == "score" else min
        results["base"] = {"checkpoint": str(repro.base_checkpoint), "test": tests["base"], "selected_by": key,
                           "early_stop_step": stopped,
                           "val_best": pick((e[key] for e in base_val), default=None),
                           "steps": max((e["step"] for e in base_val), default=None),
                           "curve": [[e["step"], e[key]] for e in base_val if key in e]}
    rows = []
    for (b, arm, seed), run_dir in repro.arm_runs().items():
        row = {"budget": b, "arm": arm, "seed": seed, **run_row(run_dir, task.higher_is_better)}
        label = str(run_dir.relative_to(repro.out))
        row["test"] = tests.get(label, {})
        rows.append(row)
    results["runs"] = rows
    results["summary"] = summarize(rows, results.get("base"), list(repro.decodes()), task.test_keys)
    if not task.from_scratch and "chrf" in task.test_keys:  # sacrebleu's bootstrap: text metrics only
        results["significance"] = significance(rows, repro.references(), task.metric)
    if task.name.startswith("completion") and "greedy" in repro.decodes():
        results["examples"] = side_by_side(repro, rows)
    if task.limits or repro.budget.limits:
        results["limits"] = {str(limit): json.loads(repro.limit_file(limit).read_text()) for limit in repro.limits()}
    if task.name in PAPER_SETTING:
        results["paired"] = paired_tests(rows, baselines=("mle", "mgs_blind", "pg", "grpo"))
    results["verdict"] = task_verdict(results)
    return results


# The paper's completion setting: on tiny_gpt2 (completion_paper) and on SmolLM2-135M (completion_real)
PAPER_SETTING = ("completion_paper", "completion_real")


def task_verdict(results: dict) -> list[str]:
    if results["task"] in PAPER_SETTING:
        return completion_paper_verdict(results)
    return completion_verdict(results) if results["task"] == "completion" else verdict(results)


def side_by_side(repro, rows: list[dict], n: int = 5) -> list[dict]:
    """The first n test examples: prefix, reference, the base's and MGS's (first seed) greedy continuations."""
    mgs = next((r for r in rows if r["arm"] == "mgs" and "greedy" in r["test"]), None)
    base = repro.test_file("base", "greedy")
    if mgs is None or not base.is_file():
        return []
    mle_hyps, mgs_hyps = (Path(result["predictions"]).read_text(encoding="utf-8").splitlines()
                          for result in (json.loads(base.read_text()), mgs["test"]["greedy"]))
    return [{"seed": mgs["seed"], "prefix": prefix, "reference": reference, "mle": mle, "mgs": hyp}
            for (prefix, reference), mle, hyp in zip(repro.completion_examples()[:n], mle_hyps, mgs_hyps)]


def summarize(rows: list[dict], base: dict | None, decodes: list[str],
              test_keys: dict | None = None) -> dict:
    """budget -> arm -> quantity -> [mean, std] over seeds (test quantities also Δ vs the base)."""
    out = {}
    for row in rows:
        out.setdefault(row["budget"], {}).setdefault(row["arm"], []).append(row)
    summary = {}
    for b, arms in out.items():
        for arm, group in arms.items():
            s = {k: list(mean_std([r[k] for r in group])) for k in ("steps", "s_per_step", "train_s", "val_best")}
            for d in decodes:
                for key, name in (test_keys or {"score": "test", "chrf": "chrf"}).items():
                    values = [r["test"][d][key] for r in group if d in r["test"]]
                    if values:
                        s[f"{name}_{d}"] = list(mean_std(values))
                        if base:
                            s[f"{name}_{d}_delta"] = s[f"{name}_{d}"][0] - base["test"][d][key]
            diags = [r["diagnostics"] for r in group if r["diagnostics"]]
            if diags:
                s["diagnostics"] = {k: sum(d[k] for d in diags) / len(diags) for k in DIAGNOSTICS}
                for k in HELD_OUT:
                    if all(k in d for d in diags):
                        s["diagnostics"][k] = sum(d[k] for d in diags) / len(diags)
                s["diagnostics"]["num_samples"] = diags[0].get("num_samples")
                if all("loss_spread_std" in d for d in diags):
                    s["diagnostics"]["loss_spread_std"] = sum(d["loss_spread_std"] for d in diags) / len(diags)
            summary.setdefault(b, {})[arm] = s
    return summary


def significance(rows: list[dict], references: list[list[str]], metric: str) -> dict:
    """budget -> seed -> "a vs b" -> metric -> {score, baseline, delta, p}; greedy predictions."""
    metrics = ("bleu", "chrf") if metric == "bleu" else ("chrf",)  # sacrebleu has no ROUGE
    by = {}
    for r in rows:
        if "greedy" in r["test"]:
            hyps = Path(r["test"]["greedy"]["predictions"]).read_text(encoding="utf-8").splitlines()
            by.setdefault(r["budget"], {}).setdefault(r["seed"], {})[r["arm"]] = hyps
    out = {}
    for b, seeds in by.items():
        for seed, arms in seeds.items():
            pairs = {}
            for baseline in ("mle", "mgs", "mgs_blind", "pg"):
                # every arm against continued MLE, the other rules against MGS, extra arms (--arm) also against
                # MGS-blind, GRPO against PG (what group advantages and the KL anchor add): each pair once
                others = [(a, h) for a, h in arms.items() if a != baseline and (
                    baseline == "mle" or (baseline == "mgs" and a != "mle")
                    or (baseline == "mgs_blind" and a not in STANDARD_ARMS) or (baseline == "pg" and a == "grpo"))]
                if baseline in arms and others:
                    for a, res in paired_bootstrap((baseline, arms[baseline]), others, references, metrics).items():
                        pairs[f"{a} vs {baseline}"] = res
            for a in arms:  # an extra arm X_blind (uniform weights) against its own X: what X's weights add
                twin = a.removesuffix("_blind")
                if a not in STANDARD_ARMS and a != twin and twin in arms and twin not in STANDARD_ARMS:
                    pairs[f"{a} vs {twin}"] = paired_bootstrap((twin, arms[twin]), [(a, arms[a])], references,
                                                               metrics)[a]
            out.setdefault(b, {})[str(seed)] = pairs
    return out


def verdict(results: dict) -> list[str]:
    """Sentences computed from the numbers: MGS against each other arm, per budget, on greedy test."""
    sig = results.get("significance")
    if not sig:
        return []
    name = {"mle": "continued MLE", "pg": "PG", "grpo": "GRPO", "mrt": "MRT", "mgs_blind": "MGS-blind", "mgs": "MGS"}
    key, metric = ("bleu", "BLEU") if results["metric"] == "bleu" else ("chrf", "chrF")
    sentences = []
    for b, seeds in sig.items():
        label = b.replace("_", " ")
        for other in ("mle", "pg", "grpo", "mrt", "mgs_blind"):
            # "a vs b": b was the bootstrap's baseline, delta = a - b.
            pair, sign = ("mgs vs mle", 1) if other == "mle" else (f"{other} vs mgs", -1)
            found = [seeds[s][pair][key] for s in seeds if pair in seeds[s]]
            if not found:
                continue
            text = compare_sentence("MGS", name[other], [sign * f["delta"] for f in found], [f["p"] for f in found],
                                    f"{metric} (greedy)")
            sentences.append(f"At {label}: {text}")
        found = [seeds[s]["grpo vs pg"][key] for s in seeds if "grpo vs pg" in seeds[s]]
        arms = results["summary"].get(b, {})
        if found:
            text = compare_sentence("GRPO", "PG", [f["delta"] for f in found], [f["p"] for f in found],
                                    f"{metric} (greedy)")
            sentences.append(f"At {label}: {text}")
        elif "test_greedy" in arms.get("grpo", {}) and "test_greedy" in arms.get("pg", {}):
            # runs from before the grpo-vs-pg bootstrap: the means only, said as such
            delta = arms["grpo"]["test_greedy"][0] - arms["pg"]["test_greedy"][0]
            sentences.append(f"At {label}: GRPO minus PG on test {metric} (greedy): mean Δ {delta:+.2f} over "
                             f"{len(results['seeds'])} seeds (no paired test of the two in this run).")
        for extra in sorted({p.split(" vs ")[0] for s in seeds.values() for p in s} - set(STANDARD_ARMS)):
            for other in ("mle", "mgs_blind"):
                found = [seeds[s][f"{extra} vs {other}"][key] for s in seeds if f"{extra} vs {other}" in seeds[s]]
                if found:
                    text = compare_sentence(extra, name[other], [f["delta"] for f in found], [f["p"] for f in found],
                                            f"{metric} (greedy)")
                    sentences.append(f"At {label}: {text}")
            twin = f"{extra}_blind vs {extra}"  # what the extra arm's weights add over its uniform-weight twin
            found = [seeds[s][twin][key] for s in seeds if twin in seeds[s]]
            if found:
                text = compare_sentence(extra, f"{extra}_blind", [-f["delta"] for f in found], [f["p"] for f in found],
                                        f"{metric} (greedy)")
                sentences.append(f"At {label}: {text}")
        diag = results["summary"].get(b, {}).get("mgs", {}).get("diagnostics")
        if diag:
            k = diag.get("num_samples") or "K"
            sentences.append(
                f"At {label}, MGS's importance weights had ESS {diag['ess']:.2f} of {k} on average, "
                f"{100 * diag['guided_weight']:.0f} % of the weight on guided samples; the best perturbation "
                f"lowered the batch task loss by {diag['best_improvement']:.4f} on average, and θ's task loss "
                f"exceeded the mean perturbed loss by {diag['loss_minus_perturbed_mean']:+.4f}"
                + (" — the weights were close to uniform, so the update was mostly the average of the "
                   "perturbations, which is what MGS-blind does." if isinstance(k, int) and diag["ess"] > 0.9 * k
                   else "."))
    return sentences


def completion_verdict(results: dict) -> list[str]:
    """The completion issue's bar, checked against the numbers (greedy test, mean over seeds)."""
    base = (results.get("base") or {}).get("test", {}).get("greedy")
    sentences = []
    for b, arms in results["summary"].items():
        mgs = arms.get("mgs")
        if not mgs or base is None or "repetition_greedy" not in mgs:
            continue
        label = b.replace("_", " ")
        rep, nonterm = mgs["repetition_greedy"][0], mgs["nontermination_greedy"][0]
        ppl = mgs["perplexity_greedy"][0]
        for name, value, ref in (("seq-rep-4", rep, base["repetition"]), ("non-termination", nonterm,
                                                                          base["nontermination"])):
            halved = value <= 0.5 * ref
            sentences.append(f"At {label}: MGS's {name} is {value:.3f} against the MLE base's {ref:.3f} "
                             f"({'at least halved' if halved else 'not halved'}: ×{value / ref:.2f})."
                             if ref > 0 else f"At {label}: the MLE base's {name} is 0; MGS's is {value:.3f}.")
        change = ppl / base["perplexity"] - 1
        sentences.append(f"At {label}: the references' perplexity under MGS is {ppl:.2f} against {base['perplexity']:.2f} "
                         f"({100 * change:+.1f} %, {'within' if change <= 0.10 else 'beyond'} the +10 % allowed).")
        for other in ("mgs_blind", "pg", "grpo", "mrt", "mle"):
            if other in arms and "task_loss_greedy" in arms[other]:
                a, o = mgs["task_loss_greedy"][0], arms[other]["task_loss_greedy"][0]
                sentences.append(f"At {label}: MGS's test task loss {a:.4f} is "
                                 f"{'lower than' if a < o else 'not lower than'} {ARM_NAMES.get(other, other)}'s "
                                 f"{o:.4f} (mean of {len(results['seeds'])} seeds).")
        diag = mgs.get("diagnostics")
        if diag:
            sentences.append(f"At {label}, MGS's importance weights had ESS {diag['ess']:.2f} of "
                             f"{diag.get('num_samples') or 'K'}, {100 * diag['guided_weight']:.0f} % of the weight "
                             f"on guided samples; the best perturbation lowered the batch task loss by "
                             f"{diag['best_improvement']:.4f} on average.")
    return sentences


def completion_paper_verdict(results: dict) -> list[str]:
    """The paper-setting issue's bar, from the numbers: the base degenerates at the decode limit; MGS-LM
    halves its non-termination and seq-rep-4 with the references' perplexity within +10 %; and MGS-LM
    beats MGS-blind and continued MLE (paired bootstrap per seed on the test outputs)."""
    base = (results.get("base") or {}).get("test", {}).get("greedy")
    if base is None:
        return []
    names = {"mle": "continued MLE", "mgs_blind": "MGS-blind", "mgs_default": "MGS-LM (default proposal)",
             "pg": "PG-LM", "grpo": "GRPO-LM", "mrt": "MRT-LM", "mgs_steer": "MGS-steer"}
    degenerate = base["nontermination"] >= 0.10 or base["seq_rep"] >= 0.30
    sentences = [f"The MLE base {'degenerates' if degenerate else 'does not degenerate'} at the test decode limit: "
                 f"non-termination {base['nontermination']:.3f} (bar >= 0.10), seq-rep-4 per continuation "
                 f"{base['seq_rep']:.3f} (bar >= 0.30)."]
    for b, arms in results["summary"].items():
        mgs, label = arms.get("mgs"), b.replace("_", " ")
        if not mgs or "seq_rep_greedy" not in mgs:
            continue
        for key, what in (("nontermination", "non-termination"), ("seq_rep", "seq-rep-4")):
            value, ref = mgs[f"{key}_greedy"][0], base[key]
            factor = ref / value if value > 0 else float("inf")
            sentences.append(f"At {label}: MGS-LM's {what} is {value:.3f} against the base's {ref:.3f}: ×{1 / factor:.2f} "
                             f"({'meets' if factor >= 2 else 'misses'} the 2× reduction)." if ref > 0 else
                             f"At {label}: the base's {what} is 0; MGS-LM's is {value:.3f}.")
        ppl = mgs["perplexity_greedy"][0]
        change = ppl / base["perplexity"] - 1
        sentences.append(f"At {label}: the references' perplexity under MGS-LM is {ppl:.2f} against the base's "
                         f"{base['perplexity']:.2f} ({100 * change:+.1f} %, {'within' if change <= 0.10 else 'beyond'} "
                         f"the +10 % allowed).")
        seeds = (results.get("paired") or {}).get(b, {})
        for other in ("mgs_blind", "mle", "mgs_default", "pg", "grpo", "mrt"):
            for key, what, digits_ in (("task_loss", "task loss (summed NLL)", 2), ("seq_rep", "seq-rep-4", 3),
                                       ("nontermination", "non-termination", 3)):
                found = [seeds[s][f"mgs vs {other}"][key] for s in seeds if f"mgs vs {other}" in seeds[s]]
                if found:  # a lower loss is better: the sentence's Δ is the baseline's minus MGS-LM's
                    sentences.append(f"At {label}: " + compare_sentence(
                        "MGS-LM", names[other], [-f["delta"] for f in found], [f["p"] for f in found],
                        f"{what}, reduction", digits_))
        diag = mgs.get("diagnostics")
        if diag:
            sentences.append(f"At {label}, MGS-LM's importance weights had ESS {diag['ess']:.2f} of "
                             f"{diag.get('num_samples') or 'K'}, {100 * diag['guided_weight']:.0f} % of the weight on "
                             f"guided samples; the K losses' spread (std of C(θ+Δ_k) - C(θ)) was "
                             f"{diag.get('loss_spread_std', float('nan')):.3f} and the best perturbation lowered the "
                             f"batch task loss by {diag['best_improvement']:.3f} on average.")
    for b, seeds in (results.get("paired") or {}).items():
        # GRPO: what group advantages and the KL anchor add over PG; against more MLE. An extra arm grpo_X
        # (--arm, e.g. grpo_nokl='trainer=grpo trainer.kl_coef=0'): what taking X out of GRPO changes.
        variants = sorted({p.split(" vs ")[0] for s in seeds.values() for p in s if p.startswith("grpo_")})
        comparisons = [("grpo", "GRPO-LM", other) for other in ("pg", "mle")]
        comparisons += [("mgs_steer", "MGS-steer", other) for other in ("mgs_blind", "mle")]  # completion_real
        comparisons += [(v, v, other) for v in variants for other in ("grpo", "pg")]
        for arm, label, other in comparisons:
            for key, what, digits_ in (("task_loss", "task loss (summed NLL)", 2), ("seq_rep", "seq-rep-4", 3),
                                       ("nontermination", "non-termination", 3)):
                found = [seeds[s][f"{arm} vs {other}"][key] for s in seeds if f"{arm} vs {other}" in seeds[s]]
                if found:
                    sentences.append(f"At {b.replace('_', ' ')}: " + compare_sentence(
                        label, names.get(other, other), [-f["delta"] for f in found], [f["p"] for f in found],
                        f"{what}, reduction", digits_))
    return sentences


def limits_markdown(limits: dict) -> list[str]:
    rows = [[limit, f"{r['nontermination']:.3f}", f"{r['seq_rep']:.3f}", f"{r['repetition']:.3f}",
             f"{r['mean_tokens']:.1f}", f"{r['score']:.2f}"] for limit, r in limits.items()]
    n = next(iter(limits.values()))["n"]
    return ["## Degeneration of the base against the decode limit", "",
            f"The MLE base decoded greedily on {n} validation sequences (the arms' validation rows) with "
            "decode.max_new_tokens set to each limit; non-termination = no EOS within the limit.", "",
            markdown_table(["max new tokens", "non-term.", "seq-rep-4 (per continuation)", "seq-rep-4 (pooled)",
                            "mean tokens", "task loss"], rows), ""]


def paired_markdown(paired: dict, label_of: dict) -> list[str]:
    lines = []
    for b, seeds in paired.items():
        pairs = list(dict.fromkeys(p for s in seeds.values() for p in s))
        header = ["comparison (greedy test)"] + [f"seed {s}: Δ{k} (p)" for s in seeds for k in PER_EXAMPLE]
        rows = [[" vs ".join(label_of.get(a, a) for a in p.split(" vs "))]
                + [f"{seeds[s][p][k]['delta']:+.{2 if k == 'task_loss' else 3}f} ({seeds[s][p][k]['p']:.3f})"
                   if p in seeds[s] else "-" for s in seeds for k in PER_EXAMPLE] for p in pairs]
        lines += [f"### Paired tests, {b.replace('_', ' ')}", "",
                  "Paired bootstrap over the test sequences (1,000 resamples, numpy seed 12345), the same seed's "
                  "outputs: Δ = first minus second, lower is better for all three (task loss = summed NLL under the "
                  "base; seq-rep-4 per continuation over outputs of >= 4 tokens; non-termination); p is two-sided.",
                  "", markdown_table(header, rows), ""]
    return lines


# -- writing ------------------------------------------------------------------------------------
COLUMN_LABELS = {"chrf": "chrF", "task_loss": "task loss", "repetition": "seq-rep-4", "nontermination": "non-term.",
                 "edit": "edit dist.", "perplexity": "ref. ppl", "mean_words": "words",
                 "seq_rep": "seq-rep-4 (per cont.)", "mean_tokens": "tokens"}


def column_label(name: str, metric: str) -> str:
    return f"test {metric}" if name == "test" else COLUMN_LABELS.get(name, name)


def digits(name: str) -> int:
    """Decimals shown: BLEU-like scores 2, shares and distances 3."""
    return 3 if name in ("task_loss", "repetition", "nontermination", "edit", "seq_rep") else 2


def examples_markdown(examples: list[dict]) -> list[str]:
    lines = ["## Continuations side by side", "",
             f"The first {len(examples)} test prefixes, greedy: the MLE base against MGS (seed "
             f"{examples[0]['seed']}), whitespace collapsed.", ""]
    for i, e in enumerate(examples, 1):
        cell = lambda text: " ".join(text.split()).replace("|", "\\|") or "(empty)"  # noqa: E731
        lines += [f"**{i}.** prefix: `{' '.join(e['prefix'].split())}`", "", "| | continuation |", "| --- | --- |",
                  f"| reference | {cell(e['reference'])} |", f"| MLE base | {cell(e['mle'])} |",
                  f"| MGS | {cell(e['mgs'])} |", ""]
    return lines


STANDARD_ARMS = ("mle", "pg", "grpo", "mrt", "mgs", "mgs_blind")
ARM_NAMES = {"mle": "MLE, continued", "pg": "PG", "grpo": "GRPO", "mrt": "MRT", "mgs": "MGS",
             "mgs_blind": "MGS-blind (uniform weights)"}


PAPER_ARM_NAMES = {"mgs": "MGS-LM (paper's proposal)", "mgs_blind": "MGS-LM-blind (uniform weights)",
                   "mgs_default": "MGS-LM (default proposal)", "pg": "PG-LM", "grpo": "GRPO-LM", "mrt": "MRT-LM",
                   "mgs_steer": "MGS-steer (task-aware guide)"}


def arm_names(results: dict) -> dict[str, str]:
    """Display names; from random weights MLE continues nothing; the paper's completion setting trains every
    sampling arm on the LM loss."""
    if results.get("from_scratch"):
        return {**ARM_NAMES, "mle": "MLE from scratch"}
    return {**ARM_NAMES, **PAPER_ARM_NAMES} if results.get("task") in PAPER_SETTING else ARM_NAMES


def label_of_arm(results: dict, arm: str) -> str:
    return arm_names(results).get(arm, arm)


def plot_curves(rows: list[dict], budget: str, metric: str, out: Path, names: dict[str, str] = ARM_NAMES) -> Path:
    """Validation score against step and against training time: mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    arms = {}
    for r in rows:
        if r["budget"] == budget:
            arms.setdefault(r["arm"], []).append(r["curve"])
    for arm, curves in arms.items():
        n = min(len(c) for c in curves)  # the seeds of an arm evaluate at the same steps
        steps = [curves[0][i][0] for i in range(n)]
        minutes = [sum(c[i][1] for c in curves) / len(curves) / 60 for i in range(n)]
        scores = [[c[i][2] for c in curves] for i in range(n)]
        mean = [sum(s) / len(s) for s in scores]
        for ax, x in ((by_step, steps), (by_time, minutes)):
            line, = ax.plot(x, mean, marker="o", ms=3, label=f"{names.get(arm, arm)} ({len(curves)} seeds)")
            ax.fill_between(x, [min(s) for s in scores], [max(s) for s in scores], color=line.get_color(), alpha=0.2)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training time (min, mean over seeds)")
    for ax in (by_step, by_time):
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.suptitle(f"{budget.replace('_', ' ')}: mean over seeds, band = min-max")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_csv(rows: list[dict], path: Path, decodes: list[str], keys: dict | None = None) -> None:
    keys = keys or {"score": "test", "chrf": "chrf"}
    fields = ["budget", "arm", "seed", "steps", "s_per_step", "train_s", "val_best", "val_best_step"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields + [f"{n}_{d}" for n in keys.values() for d in decodes] + ["run_dir"])
        for r in rows:
            w.writerow([r[k] for k in fields] + [r["test"].get(d, {}).get(k, "") for k in keys for d in decodes]
                       + [r["run_dir"]])


def markdown(results: dict, plots: dict[str, str], json_link: str, command: str) -> str:
    m = results["metric"].upper() if results["metric"] == "bleu" else results["metric"]
    decodes = results["decodes"]
    lines = [f"# Results: {results['task']} ({results['budget']} budget)", "",
             f"Written by `{command}` at commit `{results['commit']}` on {results['date']}; every number below "
             f"comes from runs of that command (the JSON with all of them: [{Path(json_link).name}]({json_link})). "
             "Do not edit by hand: run the command again."
             + (f" Rendered again from that JSON by `{results['rendered_by']}` at commit `{git_commit()}`."
                if results.get("rendered_by") else ""), "",
             "## Setup", "", results["notes"], "",
             f"Seeds {', '.join(map(str, results['seeds']))}. Equal training time: T = {results['train_s']:g} s "
             f"per arm, turned into a fixed step count per rule by a calibration ({results['calibration']['rounds']} "
             f"interleaved round(s) of {results['calibration']['steps']} steps of each rule from the same start, "
             "first step of each run left out): steps = round(T / seconds per step). Step counts, not a clock, so "
             "the arms are deterministic whatever the machine's load."
             + ("" if "equal_steps" not in results["calibration"]["arm_steps"] else
                " Equal steps: every rule runs MGS's step count."), ""]
    if results.get("withheld"):
        w = results["withheld"]
        lines += [f"Not reported: {', '.join(label_of_arm(results, a) for a in w['arms'])}. This run has no "
                  f"{' and no '.join(CONTROL_NAMES[a] for a in w['missing'])} arm, and an MGS number means "
                  "something only beside MGS-blind and continued MLE from the same start and budget (see "
                  "mleps_lab/reproduce_report.py: reportable). MGS still ran, to set the equal-steps count below; "
                  "its runs are in the JSON and CSV.", ""]
    steps = results["calibration"]["arm_steps"]
    header = ["rule", "s/step (calibration)"] + [f"steps, {b.replace('_', ' ')}" for b in steps]
    label_of = arm_names(results)
    lines += [markdown_table(header, [[label_of.get(a, a), f"{s:.3f}"] + [steps[b][a] for b in steps]
                                      for a, s in results["calibration"]["step_s"].items()]), ""]
    if results.get("lr_search"):
        ls = results["lr_search"]
        lines += [f"Continued MLE's learning rate (constant, no warm-up) was chosen on validation, seed 0, at its "
                  f"equal-time step count: best validation {m} " +
                  ", ".join(f"{s:.2f} at lr {lr}" for lr, s in ls["scores"].items()) +
                  f"; chosen lr {ls['chosen']:g}. Nothing was tuned on the test split.", ""]
    if results.get("base"):
        base = results["base"]
        where = Path(base["checkpoint"])
        where = where.relative_to(results["out"]) if base["checkpoint"].startswith(results["out"]) else where
        chosen = m if base.get("selected_by", "score") == "score" else "cross-entropy of the references"
        how = "by early stopping" if base.get("early_stop_step") is not None else \
            "at its step or time cap: early stopping had not fired"
        lines += ["## Base", "", f"Checkpoint `{where}`" + ("." if base["val_best"] is None else
                  f" (best validation {chosen} {base['val_best']:.{2 if chosen == m else 4}f}; the run stopped at "
                  f"step {base['steps']}, {how})."), ""]
        if base.get("curve"):  # enough of the curve to judge "converged" by eye
            shown_ = base["curve"][-6:]
            lines += [f"Its last {len(shown_)} validation evaluations (step: {chosen}): "
                      + ", ".join(f"{step}: {value:.{2 if chosen == m else 4}f}" for step, value in shown_) + ".", ""]
        keys = results.get("test_keys") or {"score": "test", "chrf": "chrf"}
        lines += [markdown_table(["decode"] + [column_label(n, m) for n in keys.values()],
                                 [[d] + [f"{base['test'][d][k]:.{digits(n)}f}" for k, n in keys.items()]
                                  for d in decodes]), ""]
    if results.get("limits"):
        lines += limits_markdown(results["limits"])
    summary = results["summary"]
    for b, arms in summary.items():
        lines += [f"## {b.replace('_', ' ').capitalize()}", ""]
        names = list((results.get("test_keys") or {"score": "test", "chrf": "chrf"}).values())
        header = ["arm", "steps", "s/step", f"best val {m}"]
        for d in decodes:
            for n in names:
                header += [f"{column_label(n, m)} {d}", "Δ base"]
        rows = []
        for arm, s in arms.items():
            row = [label_of.get(arm, arm), f"{s['steps'][0]:.0f}", f"{s['s_per_step'][0]:.3f}",
                   fmt(*s["val_best"], digits=2 if results.get("higher_is_better", True) else 4)]
            for d in decodes:
                for name in names:
                    row += [fmt(*s[f"{name}_{d}"], digits=digits(name)) if f"{name}_{d}" in s else "-",
                            f"{s[f'{name}_{d}_delta']:+.{digits(name)}f}" if f"{name}_{d}_delta" in s else "-"]
            rows.append(row)
        lines += [f"Mean ± standard deviation over {len(results['seeds'])} seeds; s/step measured in the arms' "
                  "own runs.", "", markdown_table(header, rows), ""]
        if b in plots:
            lines += [f"![validation {m} against step and time, {b}]({plots[b]})", ""]
        sig = results.get("significance", {}).get(b)
        if sig and any(sig.values()):
            pairs = list(dict.fromkeys(p for s in sig.values() for p in s))
            metrics = list(next(iter(next(iter(sig.values())).values())))
            header = ["comparison (greedy)"] + [f"seed {s}: Δ{mm} (p)" for s in sig for mm in metrics]
            rows = [[p.replace("_", "-")] + [f"{sig[s][p][mm]['delta']:+.2f} ({sig[s][p][mm]['p']:.3f})"
                                             if p in sig[s] else "-" for s in sig for mm in metrics] for p in pairs]
            lines += ["Paired bootstrap (sacrebleu, 1,000 resamples, seed 12345) on the greedy test predictions: "
                      "Δ = first minus second; p is two-sided.", "", markdown_table(header, rows), ""]
        held_out = [k for k in HELD_OUT if any(k in s.get("diagnostics", {}) for s in arms.values())]
        diag_rows = [[label_of.get(a, a)] + [f"{s['diagnostics'][k]:.4f}" for k in DIAGNOSTICS]
                     + [f"{s['diagnostics'][k]:.4f}" if k in s["diagnostics"] else "-" for k in held_out]
                     for a, s in arms.items() if "diagnostics" in s]
        if diag_rows:
            lines += ["MGS diagnostics, averaged over the training steps of all seeds"
                      + (" (the held-out columns over the steps that ran trainer.diagnose_every: Spearman "
                         "correlation of the K samples' losses on the training batch and on a held-out "
                         "validation batch; held-out task loss after the step taken minus after the "
                         "uniform-weight step)" if held_out else "") + ":", "",
                      markdown_table(["arm", "ESS", "weight on guided samples", "best improvement",
                                      "θ's task loss − mean perturbed loss"]
                                     + [{"rank_corr": "held-out rank correlation",
                                         "taken_minus_blind": "taken − blind (held out)"}[k] for k in held_out],
                                     diag_rows), ""]
    if results.get("paired"):
        lines += paired_markdown(results["paired"], label_of)
    if results.get("examples"):
        lines += examples_markdown(results["examples"])
    if results["verdict"]:
        how = "(p < 0.05 per seed counts as significant)" if results.get("significance") or results.get("paired") else \
            "(means over seeds; no significance test)"
        lines += ["## Verdict", "", f"Computed from the numbers above {how}:", ""]
        lines += [f"- {s}" for s in results["verdict"]] + [""]
    sigs = {(results["task"], d): (t.get("signature"), t.get("chrf_signature"))
            for d, t in (results.get("base") or {}).get("test", {}).items() if t.get("signature")}
    if sigs:
        lines += ["## Signatures", ""]
        for (_, d), (s1, s2) in sigs.items():
            lines += [f"- {d}: `{s1}`" + (f"; chrF `{s2}`" if s2 else "")]
        lines += [""]
    if results.get("stage_s"):
        stage_s = results["stage_s"]
        lines += ["## Wall time", "", "Wall time the driver spent running each stage's jobs on this machine (summed over "
                  "resumed invocations; a stage run earlier outside the driver, such as a placed base, counts nothing):",
                  "", markdown_table(["stage", "minutes"], [[k, f"{v / 60:.1f}"] for k, v in stage_s.items()]
                                     + [["total", f"{sum(stage_s.values()) / 60:.1f}"]]), ""]
    lines += ["## Commands", "", "Run by the driver, `--out` " f"`{results['out']}` (one log per run under its "
              "`logs/`; all commands are in the JSON). The arms of the first seed; the other seeds differ in "
              "`seed=` and the folder only:", "", "```"]
    first_seed = f"seed={results['seeds'][0]} " if results["seeds"] else ""
    for stage, cmds in results["commands"].items():
        shown = [c for c in cmds if first_seed in c] if stage == "arms" else cmds[:4]
        if shown:
            more = len(cmds) - len(shown)
            lines += [f"# {stage}: {len(cmds)} run(s)" + (f", {more} not shown" if more else "")] + shown
    lines += ["```", ""]
    return "\n".join(lines)


CONTROLS = ("mle", "mgs_blind")  # what an MGS number needs beside it to say anything about MGS's weights
CONTROL_NAMES = {"mle": "continued-MLE", "mgs_blind": "MGS-blind"}


def reportable(results: dict) -> dict:
    """The results the report shows. MGS is reported only beside MGS-blind (the same search with uniform
    weights) and continued MLE from the same start and budget: without them a gain over the base or PG could be
    the perturbations' average or more MLE, not the importance weights. A run without those arms (--arms mgs pg
    grpo) still runs MGS, whose step count sets equal steps; the report then leaves its numbers out (the JSON
    and CSV keep every run) and says so."""
    arms = {r["arm"] for r in results["runs"]}
    missing = [a for a in CONTROLS if a not in arms]
    if not missing or not arms & {"mgs", "mgs_default"}:
        return results
    hidden = {"mgs", "mgs_default"}
    keep = lambda pair: not hidden & set(pair.split(" vs "))  # noqa: E731
    out = {**results, "runs": [r for r in results["runs"] if r["arm"] not in hidden],
           "summary": {b: {a: s for a, s in arms_.items() if a not in hidden}
                       for b, arms_ in results["summary"].items()},
           "examples": [], "withheld": {"arms": sorted(hidden & arms), "missing": missing}}
    for name in ("significance", "paired"):
        if results.get(name):
            out[name] = {b: {seed: {p: v for p, v in pairs.items() if keep(p)} for seed, pairs in seeds.items()}
                         for b, seeds in results[name].items()}
    out["verdict"] = task_verdict(out)
    return out


def write_report(results: dict, md: Path, img_dir: Path, json_path: Path, command: str) -> dict[str, Path]:
    """The markdown, one plot per budget, the JSON and a CSV beside it. Returns what was written."""
    written = {}
    plots = {}
    results = {**results, "command": command}  # kept, so the report can be rendered again from the JSON alone
    report = reportable(results)
    for b in report["summary"]:
        path = plot_curves(report["runs"], b, results["metric"], img_dir / f"{results['task']}-{b}.png",
                           arm_names(results))
        written[f"plot_{b}"] = path
        plots[b] = os.path.relpath(path, md.parent)
    write_json_atomic(json_path, results)
    written["json"] = json_path
    written["csv"] = json_path.with_suffix(".csv")
    write_csv(results["runs"], written["csv"], results["decodes"], results.get("test_keys"))
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(markdown(report, plots, os.path.relpath(json_path, md.parent), command), encoding="utf-8")
    written["markdown"] = md
    return written


def main(argv=None) -> None:
    """Render a report again from its JSON (after a change to the report, with the runs long gone)."""
    import argparse
    import shlex

    p = argparse.ArgumentParser(prog="python -m mleps_lab.reproduce_report", description=main.__doc__)
    p.add_argument("json", type=Path, help="a docs/results/<task>.json written by scripts/reproduce.py")
    p.add_argument("--results-md", type=Path, required=True)
    p.add_argument("--img-dir", type=Path, required=True)
    p.add_argument("--command", help="the reproduce.py command that ran it (default: the one in the JSON)")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    command = args.command or results.get("command")
    if not command:
        raise SystemExit(f"error: {args.json} does not record the command that ran it: pass --command")
    results["rendered_by"] = " ".join(["python -m mleps_lab.reproduce_report"] + [shlex.quote(str(a)) for a in (
        args.json, "--results-md", args.results_md, "--img-dir", args.img_dir)])
    written = write_report(results, args.results_md, args.img_dir, args.json, command)
    print("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
