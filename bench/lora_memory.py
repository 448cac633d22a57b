"""Trained parameters and peak memory of REBEL with LoRA against full fine-tuning, in one run.

    python bench/lora_memory.py                       # the embedded model (SmolLM2-135M-Instruct), CPU
    python bench/lora_memory.py --lora-r 16 --batch-size 16

Each setting runs in its own process: load the policy (and, for full fine-tuning, the reference: LoRA's pi_ref is
the policy with its adapter off), then --iterations REBEL iterations of rebel.py's own `rollout` and `update` on the
embedded arithmetic prompts. It prints the trained parameters, the peak resident memory of the process (on CPU:
getrusage ru_maxrss, models + AdamW state + activations + the Python runtime; on GPU: max_memory_allocated) and the
seconds per iteration, and the LoRA / full ratios.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one(lora_r: int, a) -> dict:
    """One setting in this process."""
    import torch

    import common
    import rebel

    args = rebel.Args(lora_r=lora_r, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, num_passes=2,
                      num_minibatches=2, lr=1e-5, seed=1)
    rank, world, device = common.setup(args.seed)
    dtype, amp = common.precision(args.dtype, device)
    train_rows, _ = common.load_splits(args.dataset, args.train_split, args.eval_split, args.num_eval_prompts)
    score = common.make_scorer(None, args.reward_fn, device, dtype)
    tokenizer = common.load_tokenizer(args.model)
    rows = common.tokenize_prompts(train_rows.select(range(a.batch_size * a.iterations)), tokenizer, 512).to_list()
    policy = common.wrap(common.load_model(args.model, device, lora=args), device, dtype)
    reference = None if lora_r else common.load_model(args.model, device).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    scheduler = common.make_scheduler(optimizer, "constant", 0.0, 10 ** 6)
    start = time.perf_counter()
    for i in range(a.iterations):
        batch = rebel.rollout(policy, reference, tokenizer, rows[i * a.batch_size:(i + 1) * a.batch_size], score,
                              args, amp)
        rebel.update(policy, optimizer, scheduler, batch, args, amp)
    seconds = (time.perf_counter() - start) / a.iterations
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"trained": sum(p.numel() for p in policy.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in policy.parameters()), "peak_mib": peak / 2 ** 20, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the LoRA setting")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per iteration (two responses each)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="response length")
    parser.add_argument("--iterations", type=int, default=2, help="REBEL iterations per setting")
    parser.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)  # internal: one setting, as JSON
    a = parser.parse_args()
    if a.only is not None:
        print(json.dumps(one(a.only, a)))
        return
    results = {}
    for r in (0, a.lora_r):
        cmd = [sys.executable, __file__, "--only", str(r), "--batch-size", str(a.batch_size), "--max-new-tokens",
               str(a.max_new_tokens), "--iterations", str(a.iterations)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        results[r] = json.loads(out.stdout.strip().splitlines()[-1])
    full, lora = results[0], results[a.lora_r]
    print(f"REBEL on the embedded model, {a.iterations} iterations of {a.batch_size} prompts x 2 responses x "
          f"{a.max_new_tokens} tokens")
    print("| setting | trained parameters | peak MiB | s / iteration |")
    print("|---|---|---|---|")
    print(f"| full fine-tuning (policy + reference) | {full['trained']:,} | {full['peak_mib']:.0f} | "
          f"{full['seconds']:.1f} |")
    print(f"| LoRA r {a.lora_r} (no reference) | {lora['trained']:,} | {lora['peak_mib']:.0f} | "
          f"{lora['seconds']:.1f} |")
    print(f"| LoRA / full | {lora['trained'] / full['trained']:.4f} | {lora['peak_mib'] / full['peak_mib']:.2f} | "
          f"{lora['seconds'] / full['seconds']:.2f} |")


if __name__ == "__main__":
    main()
