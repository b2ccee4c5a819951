"""Reproduce the paper's comparisons in one resumable command.

    python scripts/reproduce.py mt                      # the MT comparison, CPU budget (target 100 min; the report times each stage)
    python scripts/reproduce.py mt --budget tiny --out /tmp/r   # the pipeline in ~2 minutes
    python scripts/reproduce.py summarization           # AESLC, ROUGE-L, a smaller budget
    python scripts/reproduce.py scratch                 # MLE, PG and MGS from random weights

Killed, it resumes at the first unfinished run when called again with the same arguments.
Stages and design: mleps_lab/reproduce.py. Writes docs/results.md (mt; other tasks
docs/results-<task>.md), plots in docs/img/ and the numbers in docs/results/<task>.json + .csv.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mleps.errors import UserError, exit_on_user_error  # noqa: E402
from mleps_lab.reproduce import PAPER, PAPERS, TASKS, Reproduction  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=PAPER, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=list(TASKS))
    p.add_argument("--budget", default="cpu", choices=["cpu", "tiny", "paper"])
    p.add_argument("--out", help="run folder (default runs/reproduce/<task>)")
    p.add_argument("--seeds", type=int, nargs="+", help="arm seeds (default: the budget's, 0 1 2 for mt)")
    p.add_argument("--base", help="a checkpoint folder to start the arms from (skips the base stage)")
    p.add_argument("--beams", type=int, nargs="+", help="test decodes' beam sizes (default: the budget's, 1 4)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="an extra arm, calibrated and run like the others, e.g. "
                        "--arm mgs_line='trainer=mgs trainer.warm_start_steps=0 trainer.line_search_scales=[1,2,4]'")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each when > 1")
    p.add_argument("--results-md", help="default docs/results.md (mt) or docs/results-<task>.md")
    p.add_argument("--img-dir", default=str(ROOT / "docs" / "img"))
    p.add_argument("--json", help="default docs/results/<task>.json (a .csv is written beside it)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.budget == "paper":
        if args.task not in PAPERS:
            raise UserError(f"--budget paper is documented for {' and '.join(PAPERS)} only")
        print(PAPERS[args.task])
        return
    out = Path(args.out or f"runs/reproduce/{args.task}")
    md = Path(args.results_md or ROOT / "docs" / ("results.md" if args.task == "mt" else f"results-{args.task}.md"))
    json_path = Path(args.json or ROOT / "docs" / "results" / f"{args.task}.json")
    extra = {}
    for spec in args.arm:
        name, sep, overrides = spec.partition("=")
        if not sep or not overrides.strip():
            raise UserError(f"--arm {spec}: write NAME=OVERRIDES, e.g. --arm mgs_rank='trainer=mgs trainer.weighting=rank'")
        extra[name.strip()] = shlex.split(overrides)
    repro = Reproduction(args.task, args.budget, out, seeds=args.seeds, base=args.base, beams=args.beams, jobs=args.jobs,
                         progress=not args.no_progress, extra_arms=extra)
    results = repro.run()
    from mleps_lab.reproduce_report import write_report

    command = "python scripts/reproduce.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    written = write_report(results, md, Path(args.img_dir), json_path, command)
    for line in results["verdict"]:
        print(line)
    print("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
