"""The evidence for resets and for regression: PPO, PPO++, DR-PO, REBEL and DPO on one embedded task, several seeds,
the same budget for all; or REFUEL against its single-turn REBEL baseline on the multi-turn task.

    python bench/compare.py --task arithmetic               # ppo ppo_plus drpo rebel dpo, seeds 1 2 3
    python bench/compare.py --task sorting --seeds 1 2 3    # the long-answer task where resets should matter
    python bench/compare.py --task multiturn                # refuel vs REBEL on the last turn only
    python bench/compare.py --task sorting --dry-run        # print the commands, run nothing
    python bench/compare.py --task sorting --plot-only      # redraw and reprint from results/sorting.json
    python bench/compare.py --task multiturn --lr 3e-6      # another setting, for all: results/multiturn-lr3e-06.json

Runs go one after another (never in parallel: 2 cores), each a subprocess `python <script>.py ... --seed s
--output-dir runs/compare/<task>/<algorithm>-<seed>`, then `python evaluate.py` on the trained policy for the KL to
the reference. A run whose folder already holds a finished run (as bench/seeds.py tells it: metrics.jsonl ending in
the before/after evaluation, and the saved model) is not run again, so a killed comparison resumes where it stopped.

The same budget for every algorithm of a single-turn task (`Task`): --num-iterations iterations of --batch-size
responses each, and the same optimizer steps, 2 passes (PPO epochs = REBEL passes) x 2 minibatches per iteration:
  - PPO, PPO++, DR-PO: --batch-size episodes per iteration, one response per prompt;
  - REBEL: half as many prompts, two responses each (the same responses per iteration, as bench_rebel_vs_ppo.py's
    default "--equal responses");
  - DPO: no sampling; the same number of optimizer steps (iterations x 4), each on as many responses as a PPO
    minibatch (--batch-size / 2 responses: a quarter of --batch-size pairs), so --num-epochs is set to that many
    pairs over the 4000 training pairs.
Everything else is each script's own default, which follows its paper where a CPU allows (docs/algorithms.md):
lr 1e-5 linear decay, sampling temperature 0.7, greedy evaluation, kl_coef 0.05, PPO++ beta 0.2 (a roll-in by
pi_ref 80% of the time), DR-PO reset_prob 1.0 (always a prefix of the reference answer), REBEL eta 1 and
mu = policy (both responses from pi_t), DPO beta 0.1, EOS penalty -1.

The multi-turn task: REFUEL (refuel.py's defaults: H_max 5, the reset turn h ~ U{1..H}) against the REFUEL paper's
baseline, REBEL on single-turn pairs that differ only in the last turn (h = H), the same pairs per iteration and
iterations: refuel.py with `--reset-turn last`.

Results: results/<task>.json, a list of runs {algorithm, task, seed, eval_before, eval_after, kl, seconds, curve,
...}: eval_* the held-out greedy score before and after training (the scripts' own evaluation; per turn, a list, on
the multi-turn task), kl the KL to the reference of the trained policy's T=0.7 samples on the held-out prompts
(evaluate.py; None on the multi-turn task), seconds the training run's wall time, curve its per-iteration metrics.
Then results/<task>_curves.png (training reward per iteration, mean and spread over seeds, with the held-out score
before and after; the training reward includes the EOS penalty and, for the reset algorithms, the handed prefix),
results/<task>_kl.png (held-out sampled reward against KL) and a markdown table. A results file holds the runs of the
--algorithms and --seeds asked for (finished ones are read back, not rerun). Wall times are only comparable on quiet
cores.

Per-run budget, set so one run takes 3-8 minutes on 2 quiet cores: arithmetic, the scripts' defaults (PPO ~7 min);
sorting, 6 iterations of 16 responses up to 32 tokens (the reference answer is 22 tokens + EOS), 100 held-out
prompts (PPO: 8 iterations took 763 s with other jobs on the cores, ~45 s an iteration when quiet, so ~6 min for 6);
multiturn, refuel.py's defaults. evaluate.py adds about a minute to each run.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seeds import final_metrics, scores  # noqa: E402  (bench/seeds.py: how a finished run is read)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PAIRS = 4000  # training rows of the embedded preference datasets (embedded.py's num_train)


@dataclass
class Task:
    """One task's data, reward and per-run budget (the same for every algorithm)."""

    dataset: str
    """prompts (and reference answers) of the RL scripts"""
    preferences: str | None
    """preference pairs for DPO (None: no DPO)"""
    reward_fn: str
    """the rule reward"""
    num_iterations: int
    """iterations of every RL run"""
    batch_size: int
    """responses per iteration (PPO family: episodes; REBEL: half as many prompts, two responses each)"""
    max_new_tokens: int
    """response length limit"""
    num_eval_prompts: int
    """held-out prompts evaluated before and after training, and by evaluate.py"""


TASKS = {
    "arithmetic": Task("arithmetic", "arithmetic-preferences", "embedded:arithmetic_reward", num_iterations=12,
                       batch_size=16, max_new_tokens=16, num_eval_prompts=150),
    "sorting": Task("sorting", "sorting-preferences", "embedded:sorting_reward", num_iterations=6, batch_size=16,
                    max_new_tokens=32, num_eval_prompts=100),  # PPO: ~45 s an iteration on 2 quiet cores
    "multiturn": Task("arithmetic", None, "embedded:arithmetic_chain_reward", num_iterations=6, batch_size=16,
                      max_new_tokens=16, num_eval_prompts=32),
}
SINGLE_TURN = ["ppo", "ppo_plus", "drpo", "rebel", "dpo"]
MULTI_TURN = ["refuel", "rebel_last_turn"]
LAST_TURN_FLAGS = ["--reset-turn", "last"]  # refuel.py as the baseline: h = H, pairs differ in the last answer only


@dataclass
class Args:
    task: Literal["arithmetic", "sorting", "multiturn"] = "arithmetic"
    """which embedded task: the single-turn arithmetic or sorting task, or refuel.py's multi-turn task"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds; each algorithm runs once per seed"""
    algorithms: list[str] | None = None
    """a subset to run (default: ppo ppo_plus drpo rebel dpo, or refuel rebel_last_turn for multiturn)"""
    output_dir: str = "runs/compare"
    """the runs go to <output-dir>/<task>/<algorithm>-<seed>"""
    results_dir: str = "results"
    """where <task>.json, <task>_curves.png and <task>_kl.png are written"""
    dry_run: bool = False
    """print the commands (marking the runs already finished) and run nothing"""
    plot_only: bool = False
    """run nothing: draw the figures and print the table from <results-dir>/<task>.json"""
    num_iterations: int | None = None
    """a setting other than the task's budget, for every algorithm (its runs and results are named
    <task>-it<N>, so they never mix with the budget's)"""
    lr: float | None = None
    """a learning rate for every algorithm instead of each script's default (named <task>-lr<lr>)"""
    eta: float | None = None
    """REBEL's and REFUEL's eta instead of the scripts' default 1 (named <task>-eta<eta>)"""


def setting(args: Args) -> tuple[str, Task, dict]:
    """The comparison's name (<task>, or <task>-it<N>-lr<lr>-eta<eta> for the settings given), its budget, and the
    flags added to the training commands ({flag: value}; see train_command)."""
    task = TASKS[args.task]
    if args.num_iterations is not None:
        task = dataclasses.replace(task, num_iterations=args.num_iterations)
    chosen = {key: value for key, value in (("it", args.num_iterations), ("lr", args.lr), ("eta", args.eta))
              if value is not None}
    name = "-".join([args.task] + [f"{key}{value:g}" for key, value in chosen.items()])
    return name, task, {f"--{key}": value for key, value in chosen.items() if key != "it"}


def train_command(algorithm: str, task: Task, seed: int, run_dir: str, extra: dict | None = None) -> list[str]:
    """The training command of one run: the script, the task, the shared budget, the seed and the folder; then the
    `extra` flags ({"--lr": 3e-6, "--eta": 0.1}; --eta only where the script has it: REBEL, REFUEL)."""
    extra = [x for flag, value in (extra or {}).items() if flag != "--eta" or algorithm in ("rebel", *MULTI_TURN)
             for x in (flag, value)]
    if algorithm in MULTI_TURN:
        flags = ["--num-iterations", task.num_iterations, "--batch-size", task.batch_size,
                 "--num-eval-prompts", task.num_eval_prompts]
        return ["refuel.py", *flags, *(LAST_TURN_FLAGS if algorithm == "rebel_last_turn" else []), *extra,
                "--seed", seed, "--output-dir", run_dir]
    shared = ["--reward-fn", task.reward_fn, "--max-new-tokens", task.max_new_tokens]
    steps = task.num_iterations * 2 * 2  # iterations x passes x minibatches
    if algorithm == "dpo":
        pairs = task.batch_size // 4  # a PPO minibatch's responses, as chosen/rejected pairs
        epochs = (steps * pairs + 0.5) / TRAIN_PAIRS  # dpo.py takes int(epochs * rows) // batch-size steps
        flags = ["--dataset", task.preferences, "--batch-size", pairs, "--num-epochs", f"{epochs:.6g}",
                 "--num-eval-pairs", task.num_eval_prompts]
    elif algorithm == "rebel":
        flags = ["--dataset", task.dataset, "--num-iterations", task.num_iterations, "--batch-size",
                 task.batch_size // 2, "--num-passes", 2, "--num-minibatches", 2,
                 "--num-eval-prompts", task.num_eval_prompts]
    else:
        flags = ["--dataset", task.dataset, "--num-iterations", task.num_iterations, "--batch-size",
                 task.batch_size, "--num-ppo-epochs", 2, "--num-minibatches", 2,
                 "--num-eval-prompts", task.num_eval_prompts]
    return [f"{algorithm}.py", *flags, *shared, *extra, "--seed", seed, "--output-dir", run_dir]


def kl_command(task: Task, run_dir: str) -> list[str]:
    """evaluate.py on the trained policy: its T=0.7 samples' reward and KL to the reference, held-out prompts."""
    return ["evaluate.py", "--policy", run_dir, "--dataset", task.dataset, "--reward-fn", task.reward_fn,
            "--num-prompts", task.num_eval_prompts, "--max-new-tokens", task.max_new_tokens, "--temperature", 0.7,
            "--output-dir", os.path.join(run_dir, "evaluate")]


def run(command: list) -> float:
    """Run `python <command>` in the project root (its output on ours); its wall time in seconds."""
    command = [str(c) for c in command]
    print("$ python " + " ".join(command), flush=True)
    start = time.time()
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True)
    return time.time() - start


def curve(run_dir: str) -> list[dict]:
    """The per-iteration (DPO: per logged step) metrics of a run: metrics.jsonl without its final evaluation line."""
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return [line for line in lines if not any(key.endswith("_after") for key in line)]


def record(algorithm: str, task_name: str, seed: int, run_dir: str) -> dict:
    """One finished run as a results entry (scores: a number, or a list per turn on the multi-turn task)."""
    before, after = scores(final_metrics(run_dir))
    timing, evaluation = os.path.join(run_dir, "seconds.json"), os.path.join(run_dir, "evaluate", "eval.json")
    seconds = json.load(open(timing))["seconds"] if os.path.exists(timing) else None
    sampled = json.load(open(evaluation))["policies"][0] if os.path.exists(evaluation) else {}
    single = task_name != "multiturn"
    return {"algorithm": algorithm, "task": task_name, "seed": seed,
            "eval_before": before[0] if single else before, "eval_after": after[0] if single else after,
            "kl": sampled.get("kl"), "sampled_reward_after": sampled.get("reward"), "seconds": seconds,
            "curve": curve(run_dir), "run_dir": run_dir}


def run_all(args: Args, name: str, task: Task, extra: dict, algorithms: list[str]) -> list[dict]:
    """Every (algorithm, seed) run not finished yet, one after another; the results file rewritten after each."""
    results, path = [], os.path.join(args.results_dir, f"{name}.json")
    for algorithm in algorithms:
        for seed in args.seeds:
            run_dir = os.path.join(args.output_dir, name, f"{algorithm}-{seed}")
            command = train_command(algorithm, task, seed, run_dir, extra)
            if final_metrics(run_dir) is None:
                seconds = run(command)
                with open(os.path.join(run_dir, "seconds.json"), "w") as f:
                    json.dump({"seconds": seconds}, f)
            if args.task != "multiturn" and not os.path.exists(os.path.join(run_dir, "evaluate", "eval.json")):
                run(kl_command(task, run_dir))
            results.append(record(algorithm, args.task, seed, run_dir))
            os.makedirs(args.results_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    return results


def dry_run(args: Args, name: str, task: Task, extra: dict, algorithms: list[str]):
    """Print every command the comparison would run, marking runs that are already finished."""
    for algorithm in algorithms:
        for seed in args.seeds:
            run_dir = os.path.join(args.output_dir, name, f"{algorithm}-{seed}")
            done = "  # finished: skipped" if final_metrics(run_dir) is not None else ""
            print("python " + " ".join(map(str, train_command(algorithm, task, seed, run_dir, extra))) + done)
            if args.task != "multiturn":
                print("python " + " ".join(map(str, kl_command(task, run_dir))))


def mean_std(values: list, digits: int = 3) -> str:
    """'mean +- sample std' over seeds ('-' when nothing was measured)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.{digits}f}"


def table(results: list[dict]) -> str:
    """The markdown table: per algorithm, held-out score before, after (mean +- std over seeds), KL, seconds."""
    lines = ["| algorithm | seeds | eval before | eval after | KL | seconds |", "|---|---|---|---|---|---|"]
    for algorithm in dict.fromkeys(r["algorithm"] for r in results):
        runs = [r for r in results if r["algorithm"] == algorithm]

        def cell(key):
            if isinstance(runs[0][key], list):  # per turn
                return " / ".join(mean_std(list(turn)) for turn in zip(*[r[key] for r in runs]))
            return mean_std([r[key] for r in runs])

        lines.append(f"| {algorithm} | {len(runs)} | {cell('eval_before')} | {cell('eval_after')} | "
                     f"{mean_std([r['kl'] for r in runs])} | {mean_std([r['seconds'] for r in runs], 0)} |")
    return "\n".join(lines)


def plot_curves(results: list[dict], task_name: str, path: str, iterations: int):
    """Training reward per iteration (mean over seeds, band: min to max), and the held-out score (mean over seeds,
    over turns on the multi-turn task) before training at iteration 0 and after it at the last iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algorithm in dict.fromkeys(r["algorithm"] for r in results):
        runs = [r for r in results if r["algorithm"] == algorithm]
        series = [[p["score"] for p in r["curve"] if "score" in p] for r in runs]
        length = min(len(s) for s in series)
        color = None
        if length:
            steps = list(range(1, length + 1))
            columns = list(zip(*[s[:length] for s in series]))
            line, = ax.plot(steps, [statistics.mean(c) for c in columns], label=f"{algorithm} (train)")
            ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2,
                            color=line.get_color())
            color = line.get_color()
        ends = [statistics.mean(statistics.mean(r[k]) if isinstance(r[k], list) else r[k] for r in runs)
                for k in ("eval_before", "eval_after")]
        ax.plot([0, iterations], ends, "o--", color=color, label=f"{algorithm} (held-out)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title(f"{task_name}: training reward (EOS penalty in; resets: with the prefix) and held-out score",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kl(results: list[dict], task_name: str, path: str) -> bool:
    """Held-out sampled reward against KL to the reference, every run and each algorithm's mean; False (nothing
    written) if no run has a KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r["kl"] is not None and r.get("sampled_reward_after") is not None]
    if not measured:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for algorithm in dict.fromkeys(r["algorithm"] for r in measured):
        runs = [r for r in measured if r["algorithm"] == algorithm]
        kl, reward = [r["kl"] for r in runs], [r["sampled_reward_after"] for r in runs]
        points = ax.scatter(kl, reward, alpha=0.4)
        ax.plot([statistics.mean(kl)], [statistics.mean(reward)], "s", color=points.get_facecolor()[0],
                label=algorithm)
    ax.set_xlabel("KL to the reference (nats per response, T=0.7)")
    ax.set_ylabel("held-out reward (T=0.7)")
    ax.set_title(task_name, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(results: list[dict], task_name: str, results_dir: str, iterations: int):
    """Draw both figures and print the table."""
    os.makedirs(results_dir, exist_ok=True)
    plot_curves(results, task_name, os.path.join(results_dir, f"{task_name}_curves.png"), iterations)
    drawn = plot_kl(results, task_name, os.path.join(results_dir, f"{task_name}_kl.png"))
    print(f"wrote {results_dir}/{task_name}_curves.png" + (f" and {task_name}_kl.png" if drawn else ""))
    print(table(results))


def main(args: Args):
    name, task, extra = setting(args)
    algorithms = args.algorithms or (MULTI_TURN if args.task == "multiturn" else SINGLE_TURN)
    if args.dry_run:
        return dry_run(args, name, task, extra, algorithms)
    if args.plot_only:
        results = json.load(open(os.path.join(args.results_dir, f"{name}.json")))
    else:
        results = run_all(args, name, task, extra, algorithms)
    report(results, name, args.results_dir, task.num_iterations)


if __name__ == "__main__":
    main(tyro.cli(Args))
