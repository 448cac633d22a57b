"""Time and peak memory per step of our RL scripts against TRL's nearest trainers, on the same work, in one run.

    python -m pip install "torch==2.13.0" "trl==1.16.0"      # TRL is not a dependency of the project: only this bench
    python bench/bench_vs_trl.py                            # embedded model, CPU: 16 prompts x 2 completions x 16 tokens
    python bench/bench_vs_trl.py --runs rebel trl-rloo      # a subset
    python bench/bench_vs_trl.py --random-init --prompts 64 --max-new-tokens 128 --steps 3   # on a GPU

The same work for every run: --prompts prompts of the embedded arithmetic task, 2 completions each (PPO, which samples
one response per prompt, gets 2 x --prompts prompts: the same number of sequences), --max-new-tokens tokens sampled
at temperature 0.7, a KL penalty of 0.05 to a frozen reference, and one optimizer step (AdamW) on the whole batch,
in float32 on CPU (bf16 autocast on a GPU for ours; TRL's bf16 flag on a GPU for TRL). TRL 1.16 has no PPO trainer;
its nearest are RLOOTrainer (REBEL-like: two completions per prompt, the other's reward as baseline) and GRPOTrainer
(group-normalised advantages, PPO's clipped ratio). Our runs are the scripts' own `rollout` and `update`
(bench/bench_rebel_vs_ppo.py's worker); TRL's go through `trainer.train()` with a callback timing each step (sampling,
reward, reference and old log-probs, loss, backward, optimizer step). Neither side checkpoints activations: TRL's
configs default to gradient checkpointing, which this bench turns off unless --trl-gradient-checkpointing.

Each run is its own subprocess (its peak memory is its own: the process's peak resident set on CPU, max allocated on a
GPU), and runs one after another: never in parallel, timings on 2 shared cores mean nothing. The first step warms
up and is not timed; the mean of the next --steps is. Prints the table and each of ours over each of TRL's.
--random-init gives every run the same fresh random weights built from --model's config (its config and tokenizer
files suffice: what a machine has when no weights can reach it); a random model almost never samples EOS, so every
completion is --max-new-tokens long on both sides.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tyro  # noqa: E402

import common  # noqa: E402

OURS, TRL = ("rebel", "ppo"), ("trl-rloo", "trl-grpo")


@dataclass
class Args:
    runs: list[str] = field(default_factory=lambda: ["rebel", "ppo", "trl-rloo", "trl-grpo"])
    """which runs: rebel, ppo (ours), trl-rloo, trl-grpo (TRL's RLOOTrainer, GRPOTrainer)"""
    model: str = common.EMBEDDED_MODEL
    """policy and reference of every run"""
    prompts: int = 16
    """prompts per step (2 completions each)"""
    max_new_tokens: int = 16
    """tokens sampled per completion"""
    steps: int = 2
    """timed steps, after one untimed warm-up step"""
    seed: int = 1
    """random seed"""
    trl_gradient_checkpointing: bool = False
    """TRL's RLOO and GRPO configs default to gradient checkpointing (the backward recomputes each block's forward);
    off here, so that both sides do the same arithmetic (ours checkpoint only when asked); on: TRL's defaults"""
    random_init: bool = False
    """random weights (seeded) from --model's config, the same for every run, instead of --model's weights"""
    only: str | None = None
    """internal: run this one in this process and print its result as JSON"""


def peak_memory(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(args: Args, name: str) -> dict:
    """REBEL: --prompts prompts x 2 responses; PPO: 2 x --prompts prompts x 1 response; one pass, one minibatch."""
    from bench_rebel_vs_ppo import Args as PairArgs, run_one
    pair = PairArgs(model=args.model, batch_size=2 * args.prompts, equal="responses", max_new_tokens=args.max_new_tokens,
                    num_passes=1, num_minibatches=1, micro_batch_size=2 * args.prompts, iterations=args.steps,
                    seed=args.seed)
    return run_one(pair, name)


def run_trl(args: Args, name: str) -> dict:
    """TRL's trainer on the embedded task, configured for the same work, timed per step by a callback."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    import embedded

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], 0.0

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.start)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    Config, Trainer = (RLOOConfig, RLOOTrainer) if name == "trl-rloo" else (GRPOConfig, GRPOTrainer)
    config = Config(output_dir=f"/tmp/bench_vs_trl/{name}", per_device_train_batch_size=2 * args.prompts,
                    num_generations=2, max_completion_length=args.max_new_tokens, temperature=0.7, top_p=1.0,
                    beta=0.05, learning_rate=1e-6, max_steps=args.steps + 1, gradient_accumulation_steps=1,
                    num_iterations=1, logging_steps=1, save_strategy="no", report_to="none", seed=args.seed,
                    bf16=device.type == "cuda", use_cpu=device.type == "cpu", dataloader_num_workers=0,
                    gradient_checkpointing=args.trl_gradient_checkpointing)
    data = embedded.dataset(common.ARITHMETIC)["train"].select_columns(["prompt"])
    timer = StepTimer()
    trainer = Trainer(model=common.resolve_model(args.model), reward_funcs=embedded.arithmetic_reward, args=config,
                      train_dataset=data, callbacks=[timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    return {"name": name, "prompts": args.prompts, "responses": 2 * args.prompts, "seconds": timer.seconds[1:],
            "memory": peak_memory(device), "device": str(device)}


def random_copy(name: str, seed: int) -> str:
    """A temporary folder holding `name`'s config, tokenizer and generation config with fresh random weights (only
    those small files are read: a hub id or a folder without weights both work)."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    source, folder = common.resolve_model(name), tempfile.mkdtemp(prefix="bench_vs_trl_")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: keep the one derived from the config
        pass
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def main(args: Args):
    if args.only is not None:
        result = run_ours(args, args.only) if args.only in OURS else run_trl(args, args.only)
        print("RESULT " + json.dumps(result), flush=True)
        return
    for name in args.runs:
        if name not in OURS + TRL:
            common.fail(f"--runs: unknown run {name!r} (choose from {', '.join(OURS + TRL)})")
    if any(name in TRL for name in args.runs):
        try:
            import trl  # noqa: F401
        except ImportError:
            common.fail('--runs: TRL is not installed; python -m pip install "torch==2.13.0" "trl==1.16.0"')
    model = random_copy(args.model, args.seed) if args.random_init else args.model
    try:
        results = run_all(args, model)
    finally:
        if args.random_init:
            shutil.rmtree(model)
    device = next(iter(results.values()))["device"]
    print(f"\n{args.model}{' (random weights)' * args.random_init} on {device}: {args.prompts} prompts x 2 completions "
          f"x {args.max_new_tokens} tokens, KL 0.05, one optimizer step; mean of {args.steps} steps after a warm-up; "
          f"TRL's gradient checkpointing {'on' if args.trl_gradient_checkpointing else 'off'}")
    print("| ours | TRL | time ours / TRL | peak memory ours / TRL |\n|---|---|---|---|")
    for ours in [n for n in args.runs if n in OURS]:
        for theirs in [n for n in args.runs if n in TRL]:
            a, b = results[ours], results[theirs]
            print(f"| {ours} | {theirs} | {a['mean'] / b['mean']:.2f}x | {a['memory'] / b['memory']:.2f}x |")


def run_all(args: Args, model: str) -> dict:
    """Each of --runs in its own subprocess, one after another; prints each one's line as it finishes."""
    results = {}
    for name in args.runs:  # one after another, each in its own process
        flags = [f"--model={model}", f"--prompts={args.prompts}", f"--max-new-tokens={args.max_new_tokens}",
                 f"--steps={args.steps}", f"--seed={args.seed}", f"--only={name}",
                 "--" + "no-" * (not args.trl_gradient_checkpointing) + "trl-gradient-checkpointing"]
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            common.fail(f"the {name} run failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])
        r = results[name]
        r["mean"] = sum(r["seconds"]) / len(r["seconds"])
        print(f"{name:9s} {r['responses']:4d} sequences  {r['mean']:7.2f} s/step (each: "
              f"{', '.join(f'{s:.2f}' for s in r['seconds'])})  {r['memory'] / 2 ** 30:6.2f} GiB peak", flush=True)
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
