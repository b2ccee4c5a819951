"""The steering benchmark's report (mleps_lab/steer.py): tables, the steering ratio, paired tests, curves.

    python -m mleps_lab.steer_report --out /work/runs/steer/bench --report docs/results/steer

re-renders the report from the run folders' result.json files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mleps.losses import build_task_loss
from mleps_lab.runs import write_json_atomic

ARM_LABELS = {"mle": "continued MLE", "pg": "PG", "grpo": "GRPO", "mrt": "MRT", "mgs": "MGS (shipped)",
              "mgs_blind": "MGS-blind (shipped, uniform weights)", "mgs_steer": "MGS-steer",
              "mgs_steer_blind": "MGS-steer-blind (uniform weights)",
              "mgs_steer_improved": "MGS-steer, guide_rows=improved (screened after)"}


def control_loss(control: str):
    from mleps_lab.steer import CONTROLS
    name, level, options = CONTROLS[control].loss
    return build_task_loss(name, level, **options)


def paired_bootstrap(loss, rows_a: np.ndarray, rows_b: np.ndarray, n: int = 2000, seed: int = 12345) -> float:
    """One-sided p that arm a's test loss is not below arm b's, resampling test sentences (paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(rows_a), size=(n, len(rows_a)))
    worse = 0
    for row in idx:
        worse += loss.loss_from_stats(rows_a[row].sum(0)) >= loss.loss_from_stats(rows_b[row].sum(0))
    return (worse + 1) / (n + 1)


def at_time(curve: list[dict], seconds: float) -> dict:
    """The last evaluation whose training seconds are within `seconds` (the start if none is)."""
    within = [c for c in curve if c["train_s"] <= seconds + 1e-9]
    return within[-1] if within else curve[0]


def summarise(results: list[dict]) -> dict:
    """Per control: per arm, means over seeds and the comparisons the benchmark's bar names."""
    out = {}
    for control in dict.fromkeys(r["control"] for r in results):
        runs = [r for r in results if r["control"] == control]
        loss = control_loss(control)
        arms = list(dict.fromkeys(r["arm"] for r in runs))
        seeds = sorted({r["seed"] for r in runs})
        by = {(r["arm"], r["seed"]): r for r in runs}
        # equal time: PG's training seconds in the same seed (the per-sequence rule the bar compares against);
        # an arm that finished sooner is read at its end, which understates what it would reach in that time
        clock = "pg" if "pg" in arms else max(arms, key=lambda a: np.mean([r["train_s"] for r in runs if r["arm"] == a]))
        equal_s = {s: by[clock, s]["train_s"] if (clock, s) in by else
                   max(by[a, s]["train_s"] for a in arms if (a, s) in by) for s in seeds}
        table = {}
        for arm in arms:
            mine = [by[arm, s] for s in seeds if (arm, s) in by]
            table[arm] = {
                "seeds": [r["seed"] for r in mine],
                "start_val": float(np.mean([r["curve"][0]["loss"] for r in mine])),
                "val_equal_steps": [r["curve"][-1]["loss"] for r in mine],
                "val_equal_time": [at_time(r["curve"], equal_s[r["seed"]])["loss"] for r in mine],
                "val_bleu_equal_steps": [r["curve"][-1]["bleu"] for r in mine],
                "test_loss": [r["test_loss"] for r in mine],
                "test_bleu": [r["test_bleu"] for r in mine],
                "test_bleu_no_bp": [r["test_bleu_no_bp"] for r in mine],
                "test_loss_corpus": [r["test_loss_corpus"] for r in mine],
                "train_s": [r["train_s"] for r in mine],
                "diagnostics": {k: float(np.mean([r["diagnostics"][k] for r in mine if k in r["diagnostics"]]))
                                for k in sorted({k for r in mine for k in r["diagnostics"]})},
            }
        best = min(np.mean(t["val_equal_time"]) for t in table.values())
        if "mgs_blind" in table:
            blind = np.mean(table["mgs_blind"]["val_equal_time"])
            for t in table.values():
                gap = blind - best
                t["steering_ratio"] = float((blind - np.mean(t["val_equal_time"])) / gap) if gap > 0 else None
        for arm, blind_arm in (("mgs", "mgs_blind"), ("mgs_steer", "mgs_steer_blind"), ("mgs_steer", "mgs_blind"),
                               ("mgs_steer_improved", "mgs_steer_blind"),
                               ("mgs_steer", "pg"), ("mgs_steer", "grpo")):
            if arm in table and blind_arm in table:
                pairs = [(by[arm, s], by[blind_arm, s]) for s in seeds if (arm, s) in by and (blind_arm, s) in by]
                table[arm].setdefault("vs", {})[blind_arm] = {
                    "test_delta": [a["test_loss"] - b["test_loss"] for a, b in pairs],
                    "p": [paired_bootstrap(loss, np.array(a["test_rows"]), np.array(b["test_rows"])) for a, b in pairs],
                }
        out[control] = {"equal_time_s": equal_s, "arms": table}
    return out


def fmt(values, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def markdown(summary: dict, command: str, budget, setup: str = "") -> str:
    lines = ["# The steering benchmark: task losses cross-entropy cannot see", "",
             f"Command: `{command}`", "", *([setup, ""] if setup else []),
             f"Budget: {budget.steps} steps per arm from one MLE base, validation every {budget.eval_every} steps; "
             f"options `{' '.join(budget.common)}`; test: `{' '.join(budget.test)}` (greedy). "
             "Loss: lower is better. Equal time: each arm's last validation within PG's training seconds (same "
             "seed); an arm that finished sooner is read at its end. Validation reports each loss's corpus form (the loop's rule); test reports the form the "
             "rules trained on and the corpus form. Steering ratio: (MGS-blind − arm) / (MGS-blind − best arm), "
             "validation, equal time. BLEU / BP: BLEU without its brevity penalty (a 0.7 length target costs 0.65x "
             "through the penalty alone). "
             "p: paired bootstrap over test sentences, one-sided, that the arm is not below the other (per seed).", ""]
    for control, block in summary.items():
        lines += [f"## {control}", "",
                  "| arm | val start | val @ equal steps | val @ equal time | steering ratio | test loss | test loss, "
                  "corpus form | test BLEU | test BLEU / BP | train s | ESS share | guided weight |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm, t in block["arms"].items():
            d = t["diagnostics"]
            ratio = t.get("steering_ratio")
            lines.append(f"| {ARM_LABELS.get(arm, arm)} | {t['start_val']:.3f} | {fmt(t['val_equal_steps'])} | "
                         f"{fmt(t['val_equal_time'])} | {'–' if ratio is None else f'{ratio:.2f}'} | "
                         f"{fmt(t['test_loss'])} | {fmt(t['test_loss_corpus'])} | {fmt(t['test_bleu'], 2)} | "
                         f"{fmt(t['test_bleu_no_bp'], 2)} | {fmt(t['train_s'], 0)} | "
                         f"{fmt([d['ess_share']], 2) if 'ess_share' in d else '–'} | "
                         f"{fmt([d['guided_weight']], 2) if 'guided_weight' in d else '–'} |")
        lines.append("")
        for arm, t in block["arms"].items():
            for other, cmp in t.get("vs", {}).items():
                ahead = sum(x < 0 for x in cmp["test_delta"])
                lines.append(f"- {ARM_LABELS.get(arm, arm)} − {ARM_LABELS.get(other, other)} on test: "
                             f"{', '.join(f'{x:+.4f}' for x in cmp['test_delta'])} (ahead in {ahead} of "
                             f"{len(cmp['test_delta'])} seeds; p {', '.join(f'{p:.3g}' for p in cmp['p'])})")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], control: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    runs = [r for r in results if r["control"] == control]
    colours = dict(zip(dict.fromkeys(r["arm"] for r in runs), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    for r in runs:
        label = ARM_LABELS.get(r["arm"], r["arm"]) if r["seed"] == min(x["seed"] for x in runs) else None
        steps = [c["step"] for c in r["curve"]]
        secs = [c["train_s"] for c in r["curve"]]
        for col, x in enumerate((steps, secs)):
            axes[0, col].plot(x, [c["loss"] for c in r["curve"]], color=colours[r["arm"]], label=label, alpha=0.7)
            axes[1, col].plot(x, [c["bleu"] for c in r["curve"]], color=colours[r["arm"]], alpha=0.7)
    for col, xlabel in enumerate(("step", "training seconds")):
        axes[0, col].set_ylabel(f"{control} loss (validation)")
        axes[1, col].set_ylabel("BLEU (validation)")
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(results: list[dict], report: Path, command: str, budget, setup: str = "") -> None:
    summary = summarise(results)
    slim = [{k: v for k, v in r.items() if k != "test_rows"} for r in results]
    write_json_atomic(report.with_suffix(".json"), {"command": command, "setup": setup, "summary": summary,
                                                    "runs": slim})
    md = markdown(summary, command, budget, setup)
    for control in summary:
        img = report.parent / "img" / f"{report.name}-{control}.png"
        plot(results, control, img)
        md += f"\n![{control}](img/{img.name})\n"
    report.with_suffix(".md").write_text(md)


def main(argv=None) -> None:
    from mleps_lab.steer import BUDGETS
    p = argparse.ArgumentParser(description="re-render the steering report from the run folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--budget", default="cpu", choices=sorted(BUDGETS))
    p.add_argument("--command", default="")
    p.add_argument("--setup", default="", help="a paragraph on the base and the machine, printed under the command")
    args = p.parse_args(argv)
    from mleps_lab.steer import summarise_run
    results = []
    for path in sorted(args.out.glob("*/*/seed*/result.json")):  # curves and test rows read again from the runs
        r = json.loads(path.read_text())
        r.update(summarise_run(path.parent, r["control"], path.parent / "test-predictions.txt"))
        results.append(r)
    write_report(results, args.report, args.command or f"python -m mleps_lab.steer_report --out {args.out}",
                 BUDGETS[args.budget], args.setup)


if __name__ == "__main__":
    main()
