"""The README's learning figures over several seeds: each script with its default flags and `--seed s`, one run after
another (never in parallel: 2 cores), then the mean and spread of the held-out score before and after training.

    python bench/seeds.py                                   # rebel ppo ppo_plus drpo dpo refuel, seeds 1 2 3
    python bench/seeds.py --scripts rebel ppo --seeds 1 2 3

Each run writes runs/seeds/<script>-<seed>/ (the script's usual output: metrics.jsonl and the trained policy) and is
skipped when that folder already holds a finished run, so an interrupted comparison picks up where it stopped. The
table is printed at the end and written to runs/seeds/summary.json. Wall times are only comparable on quiet cores.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["rebel", "ppo", "ppo_plus", "drpo", "dpo", "refuel"])
    """scripts to run (file names without .py), each with its default flags"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds; each run is `python <script>.py --seed <seed> --output-dir runs/seeds/<script>-<seed>`"""
    output_dir: str = "runs/seeds"
    """where the runs and summary.json go"""


def final_metrics(run_dir: str) -> dict | None:
    """The last line of a finished run's metrics.jsonl (the before/after evaluation), or None."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path) or not os.path.exists(os.path.join(run_dir, "config.json")):
        return None
    lines = [json.loads(line) for line in open(path) if line.strip()]
    return lines[-1] if lines and any(k.endswith("_after") for k in lines[-1]) else None


def scores(metrics: dict) -> tuple[list[float], list[float]]:
    """(before, after) held-out scores: one value, or one per turn for REFUEL."""
    before = [v for k, v in sorted(metrics.items()) if k.endswith("_before") and ("score" in k or "turn" in k)]
    after = [v for k, v in sorted(metrics.items()) if k.endswith("_after") and ("score" in k or "turn" in k)]
    return before, after


def spread(values) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(args: Args):
    summary = []
    for script in args.scripts:
        for seed in args.seeds:
            run_dir = os.path.join(args.output_dir, f"{script}-{seed}")
            metrics = final_metrics(run_dir)
            seconds = None
            if metrics is None:
                command = [sys.executable, f"{script}.py", "--seed", str(seed), "--output-dir", run_dir]
                print("$ " + " ".join(command[1:]), flush=True)
                start = time.time()
                subprocess.run(command, cwd=ROOT, check=True)
                seconds = time.time() - start
                metrics = final_metrics(run_dir)
            before, after = scores(metrics)
            summary.append({"script": script, "seed": seed, "before": before, "after": after, "seconds": seconds})
            with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
    print("\nscript     seeds  before  after (mean +- sample std over seeds; per turn for refuel)")
    for script in args.scripts:
        runs = [r for r in summary if r["script"] == script]
        after = [statistics.mean(r["after"]) if script != "refuel" else r["after"] for r in runs]
        if script == "refuel":
            turns = list(zip(*after))
            text = "  ".join(f"{statistics.mean(t):.3f}+-{spread(t):.3f}" for t in turns)
            print(f"{script:<10} {len(runs):>5}  {' '.join(f'{v:.3f}' for v in runs[0]['before'])}  ->  {text}")
        else:
            print(f"{script:<10} {len(runs):>5}  {runs[0]['before'][0]:.3f}  ->  {statistics.mean(after):.3f} +- "
                  f"{spread(after):.3f}  (seeds: {', '.join(f'{v:.3f}' for v in after)})")


if __name__ == "__main__":
    main(tyro.cli(Args))
