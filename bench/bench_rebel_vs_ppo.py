"""Time and peak memory per iteration of REBEL (rebel.py), PPO (ppo.py) and DPO (dpo.py), in one run.

REBEL and PPO run the same model, prompts, response length, passes over the batch (K = PPO epochs), minibatches and
micro-batch size, with their own scripts' `rollout` and `update`. DPO samples nothing: an iteration is the same
passes x minibatches of dpo.py's own training step (pi_ref's no-grad forward, then the policy's forward and
backward of `dpo.pair_stats`'s loss, then AdamW) on pairs of a chosen and a rejected response, each --max-new-tokens
long (fixed random tokens ending with EOS: the cost depends only on the shapes), to the same prompts as REBEL's
pairs. Each algorithm runs in its own subprocess, so its peak memory is its own: on GPU
torch.cuda.max_memory_allocated, on CPU the process's peak resident set size (getrusage ru_maxrss: models, optimizer
states, activations and the Python runtime).

"Same batch" has two readings, picked by --equal:
  responses (default): all put the same number of responses through the models per iteration: PPO samples one
    response to each of --batch-size prompts, REBEL two responses to each of the first half of those prompts, and
    DPO has a chosen and a rejected response to each of that half;
  prompts: all get the same --batch-size prompts (REBEL and DPO then have twice as many responses).

    python bench/bench_rebel_vs_ppo.py                            # embedded model, CPU, small settings
    python bench/bench_rebel_vs_ppo.py --model EleutherAI/pythia-1b-deduped --batch-size 64 --max-new-tokens 53
"""

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import tyro  # noqa: E402

import common  # noqa: E402


@dataclass
class Args:
    model: str = common.EMBEDDED_MODEL
    """policy (and reference) of every algorithm; PPO's value model starts from it"""
    reward_fn: str = "embedded:arithmetic_reward"
    """reward function of REBEL and PPO"""
    dataset: str = common.ARITHMETIC
    """prompts (the same ones for all)"""
    batch_size: int = 16
    """responses per iteration (--equal responses) or prompts per iteration (--equal prompts)"""
    equal: Literal["responses", "prompts"] = "responses"
    """what the algorithms get the same number of per iteration"""
    max_new_tokens: int = 16
    """response length (DPO's chosen and rejected responses: exactly this long)"""
    num_passes: int = 2
    """REBEL's passes = PPO's epochs = DPO's passes over each iteration's batch"""
    num_minibatches: int = 2
    """optimizer steps per pass"""
    micro_batch_size: int = 32
    """sequences per no-grad forward"""
    iterations: int = 3
    """timed iterations, after one untimed warm-up iteration"""
    seed: int = 1
    """random seed"""
    only: Literal["both", "rebel", "ppo", "dpo"] = "both"
    """internal: run one algorithm in this process and print its result as JSON (both: all three, one by one)"""


def dpo_iteration(model, reference, optimizer, scheduler, rows: list[dict], tokenizer, args: Args, beta: float, amp):
    """One DPO iteration: passes x minibatches of dpo.py's training step (as in dpo.main) on these pairs."""
    import dpo

    minibatch = len(rows) // args.num_minibatches
    for _ in range(args.num_passes):
        for start in range(0, len(rows), minibatch):
            batch = dpo.pair_batch(rows[start:start + minibatch], tokenizer, model.device)
            with torch.no_grad(), amp():
                logp_ref = dpo.sequence_logprobs(reference, batch)
            with amp():
                dpo.pair_stats(dpo.sequence_logprobs(model, batch), logp_ref, beta)[0].backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)


def with_pairs(rows: list[dict], tokenizer, length: int, generator: torch.Generator) -> list[dict]:
    """The prompts with a chosen and a rejected response of `length` tokens each (random tokens, then EOS)."""
    def response():
        return torch.randint(len(tokenizer), (length - 1,), generator=generator).tolist() + [tokenizer.eos_token_id]

    return [{"input_ids": r["input_ids"], "chosen_ids": response(), "rejected_ids": response()} for r in rows]


def run_one(args: Args, name: str) -> dict:
    """Set up `name` as its script's main() does, run warm-up + timed iterations, return time and memory."""
    import dpo
    import ppo
    import rebel

    _, _, device = common.setup(args.seed)
    dtype, amp = common.precision("auto", device)
    shared = dict(model=args.model, reward_fn=args.reward_fn, dataset=args.dataset, max_new_tokens=args.max_new_tokens,
                  num_minibatches=args.num_minibatches, micro_batch_size=args.micro_batch_size, seed=args.seed)
    prompts = args.batch_size // 2 if name != "ppo" and args.equal == "responses" else args.batch_size
    if name == "dpo":
        script_args = dpo.Args(model=args.model, batch_size=prompts, max_response_length=args.max_new_tokens,
                               seed=args.seed)
    elif name == "rebel":
        script_args = rebel.Args(**shared, batch_size=prompts, num_passes=args.num_passes)
    else:
        script_args = ppo.Args(**shared, batch_size=prompts, num_ppo_epochs=args.num_passes)
    script_args.num_iterations = args.iterations + 1
    train_rows, _ = common.load_splits(args.dataset, "train", "test", 1)
    score = common.make_scorer(None, args.reward_fn, device, dtype)
    tokenizer = common.load_tokenizer(args.model)
    train_rows = common.tokenize_prompts(train_rows, tokenizer, script_args.max_prompt_length)
    reference = common.load_model(args.model, device).requires_grad_(False)  # as in the scripts: fp32 under amp
    if name in ("rebel", "dpo"):  # as in rebel.main and dpo.main: the policy beside the frozen reference
        model = common.load_model(args.model, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=script_args.lr, eps=script_args.adam_eps, fused=True)
        scheduler = common.make_scheduler(optimizer, "linear", 0.0,
                                          script_args.num_iterations * args.num_passes * args.num_minibatches)
    else:  # as in ppo.main
        model = ppo.PolicyAndValue(common.load_model(args.model, device), ppo.load_value_model(script_args, device))
        optimizer = torch.optim.AdamW(model.parameters(), lr=script_args.lr, eps=script_args.adam_eps, fused=True)
        scheduler = common.make_scheduler(optimizer, "linear", 0.0,
                                          script_args.num_iterations * args.num_passes * args.num_minibatches)
    batches = common.prompt_batches(train_rows, prompts, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.iterations + 1):
        rows = next(batches)
        if name == "dpo":  # a preference dataset's pairs exist before training: built outside the timing
            rows = with_pairs(rows, tokenizer, args.max_new_tokens, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if name == "dpo":
            dpo_iteration(model, reference, optimizer, scheduler, rows, tokenizer, args, script_args.beta, amp)
        elif name == "rebel":
            batch = rebel.rollout(model, reference, tokenizer, rows, score, script_args, amp)
            rebel.update(model, optimizer, scheduler, batch, script_args, amp)
        else:
            batch = ppo.rollout(model, reference, tokenizer, rows, score, script_args, amp)
            batch |= ppo.advantages_and_returns(batch, script_args)
            ppo.update(model, optimizer, scheduler, batch, script_args, amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # iteration 0 warms up allocators and kernels
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        memory, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
    responses = 2 * len(rows) if name == "dpo" else len(batch["responses"])
    return {"name": name, "prompts": prompts, "responses": responses, "seconds": times,
            "memory": memory, "memory_kind": kind, "device": str(device)}


def main(args: Args):
    if args.only != "both":
        print("RESULT " + json.dumps(run_one(args, args.only)), flush=True)
        return
    results = {}
    for name in ("rebel", "ppo", "dpo"):  # one subprocess each: separate peak memory
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(args).items() if k != "only"]
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *flags, f"--only={name}"],
                             capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            common.fail(f"the {name} run failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])
    print(f"model {args.model}, device {results['ppo']['device']}, {args.max_new_tokens} new tokens, "
          f"{args.num_passes} passes x {args.num_minibatches} minibatches, equal {args.equal}, "
          f"{args.iterations} timed iterations after 1 warm-up")
    mean = {}
    for name, r in results.items():
        mean[name] = sum(r["seconds"]) / len(r["seconds"])
        print(f"{name:6s} {r['prompts']:4d} prompts {r['responses']:4d} responses   "
              f"{mean[name]:8.2f} s/iteration (min {min(r['seconds']):.2f})   "
              f"{r['memory'] / 2 ** 30:7.2f} GiB {r['memory_kind']}")
    for a, b in (("rebel", "ppo"), ("dpo", "ppo"), ("dpo", "rebel")):
        print(f"{a.upper()} / {b.upper()}: time {mean[a] / mean[b]:.2f}x, "
              f"memory {results[a]['memory'] / results[b]['memory']:.2f}x")


if __name__ == "__main__":
    main(tyro.cli(Args))
