"""Run by test_fsdp.py under torchrun: FSDP2 rollouts and evaluations in which the ranks take different branches.

usage: python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py GPT2_DIR LLAMA_DIR RM_DIR OUT_DIR

Under FSDP2 every forward of a sharded model is a collective, so a rank that calls a model more often than another
would wait forever. Each part below makes the ranks differ on purpose:
- PPO++ (tied-embedding GPT-2 policy and value, reward model sharded too): rank 0 rolls in pi_ref on every prompt
  (--beta 0), rank 1 on none (--beta 1); then greedy evaluation on 3 prompts, 2 on rank 0 and 1 on rank 1; then the
  (untrained) policy is saved.
- REFUEL (Llama policy, rule user, reference): rank 0 plays dialogues of one turn (--max-turns 1), rank 1 of up to 3;
  then greedy evaluation of 3 dialogues to --max-turns (rank 1 plays one, rank 0 two).
Each rank saves what it did to OUT_DIR/rank{r}.pt; the test compares the evaluations with one process's."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

import common  # noqa: E402
import ppo_plus  # noqa: E402
import refuel  # noqa: E402

REWARDS = os.path.join(ROOT, "tests", "rewards.py")
PROMPTS = ["abc", "hello there", "x", "a longer prompt", "q", "zz"]


def ppo_plus_part(policy_dir: str, reward_dir: str, rank: int, device, amp) -> dict:
    args = ppo_plus.Args(model=policy_dir, reward_model=reward_dir, beta=float(rank), max_new_tokens=6,
                         temperature=1.0, fsdp=True, gradient_checkpointing=True, generation_batch_size=2)
    tokenizer = common.load_tokenizer(policy_dir)
    score = common.make_scorer(reward_dir, None, device, torch.float32, fsdp=True)
    rows = common.tokenize_prompts(Dataset.from_dict({"prompt": PROMPTS}), tokenizer, 64)
    model = ppo_plus.PolicyAndValue(common.load_model(policy_dir, device), ppo_plus.load_value_model(args, device))
    model = common.wrap(model, device, torch.float32, args.fsdp, args.gradient_checkpointing)
    reference = common.wrap(common.load_model(policy_dir, device).requires_grad_(False), device, torch.float32, True)
    batch = ppo_plus.rollout(model, reference, tokenizer, rows.select(range(4)).to_list(), score, args, amp)
    evaluation = common.score_held_out(model.policy, tokenizer, rows.select(range(3)), score, 6, 0.0, 2, device)
    common.save_model(model.policy, tokenizer, os.path.join(sys.argv[4], "policy"))
    return {"prefix_length": batch["prefix_length"], "scores": batch["scores"], "evaluation": evaluation}


def refuel_part(policy_dir: str, rank: int, device, amp) -> dict:
    args = refuel.Args(model=policy_dir, max_turns=1 + 2 * rank, max_new_tokens=6, kl_coef=0.1, fsdp=True,
                       user_fn=f"{REWARDS}:echo_user", reward_fn=f"{REWARDS}:dialogue_length")
    tokenizer = common.load_tokenizer(policy_dir)
    user, score = refuel.make_user(args, device, torch.float32), refuel.make_scorer(args, device, torch.float32)
    policy = common.wrap(common.load_model(policy_dir, device), device, torch.float32, True)
    reference = common.wrap(common.load_model(policy_dir, device).requires_grad_(False), device, torch.float32, True)
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]
    batch = refuel.rollout(policy, reference, tokenizer, user, score, rows[:2], args, amp)
    args.max_turns = 3
    mine = [rows[:2], rows[2:3]][rank]  # uneven evaluation shards
    return {"horizons": batch["horizons"], "kl": batch["kl"],
            "turns": refuel.evaluate_turns(policy, tokenizer, user, score, mine, args, amp)}


if __name__ == "__main__":
    gpt2_dir, llama_dir, reward_dir, out_dir = sys.argv[1:5]
    rank, world, device = common.setup(seed=0)
    amp = common.precision("float32", device)[1]
    common.SHARED_QUERY_MIN_TOKENS = 0  # these prompts are short: share them anyway, so FSDP2 runs that path
    result = {"ppo_plus": ppo_plus_part(gpt2_dir, reward_dir, rank, device, amp),
              "refuel": refuel_part(llama_dir, rank, device, amp)}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    common.clean_exit()
