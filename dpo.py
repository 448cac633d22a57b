"""DPO: Direct Preference Optimization (Rafailov et al., 2023), the offline baseline the RL scripts compare against.

The KL-regularised RLHF objective max_pi E[r(x, y)] - beta KL(pi || pi_ref) has the closed-form optimum
pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta), so r(x, y) = beta ln pi*(y|x)/pi_ref(y|x) + beta ln Z(x). Put into the
Bradley-Terry likelihood of the preference pairs, Z(x) cancels and the policy is fitted directly, with no reward
model and no sampling:

    min_theta  E_{(x, y_w, y_l)~D} [ - ln sigmoid( beta [ (ln pi_theta(y_w|x) - ln pi_ref(y_w|x))
                                                        - (ln pi_theta(y_l|x) - ln pi_ref(y_l|x)) ] ) ]   (`dpo_loss`)

Log-probs are sequence sums over the response tokens (EOS included) at temperature 1. The sequences are exactly
those the RL scripts see: the prompt as common.tokenize_prompts renders it, then the response tokens and EOS.
Reference log-probs are computed on the fly by a frozen copy of the starting model (one extra forward without
gradient per batch: no precomputation pass, no stored table, at the cost of keeping pi_ref in memory).

    python dpo.py --model runs/sft                          # the embedded arithmetic preferences, offline on CPU
    torchrun --nproc_per_node 8 dpo.py --model runs/sft --dataset trl-lib/tldr-preference ...
"""

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import common


@dataclass
class Args:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """policy to train (hub id or folder; usually the SFT model); it is also pi_ref, the frozen reference"""
    dataset: str = "arithmetic-preferences"
    """hub id, local folder or .json/.jsonl/.csv/.parquet file with prompt/chosen/rejected (or chosen/rejected with
    an implicit prompt), plain or conversational; 'arithmetic-preferences' is the embedded task"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """split to evaluate on (if missing, the last rows of train are held out)"""
    num_eval_pairs: int = 150
    """number of held-out pairs (their prompts are also the eval prompts of the eval score)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (default: the script's file name); part of the default --run-name"""
    run_name: str | None = None
    """name of the run in every tracker and of its folder (default: <exp-name>__<seed>__<date-time>)"""
    output_dir: str | None = None
    """where the trained policy (an HF folder) and metrics.jsonl are written (default: runs/<run-name>)"""
    save_every: int = 0
    """write a checkpoint every this many optimizer steps (0: none): weights, AdamW state, schedule, data position
    and every rank's random states, for --resume"""
    keep_checkpoints: int = 1
    """how many of the latest checkpoints to keep in --output-dir"""
    resume: bool = False
    """continue from the latest checkpoint in --output-dir, with the same flags (metrics.jsonl is continued)"""
    seed: int = 1
    """random seed"""
    beta: float = 0.1
    """beta: strength of the implicit KL to pi_ref (DPO paper: 0.1, and 0.5 for TL;DR)"""
    num_epochs: float = 0.03
    """passes over the training pairs (fractions allowed); paper: 1"""
    batch_size: int = 8
    """pairs per optimizer step over all processes; DPO paper: 64"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step (lowers memory, same result)"""
    lr: float = 1e-5
    """AdamW learning rate; DPO paper: 1e-6 (RMSprop, 150 warm-up steps)"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate schedule after warm-up: linear or cosine decay to 0, or constant"""
    warmup_ratio: float = 0.0
    """fraction of the optimizer steps over which the learning rate warms up linearly from 0"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    max_prompt_length: int = 512
    """prompts are left-truncated to this many tokens (as in the RL scripts)"""
    max_response_length: int = 64
    """responses (EOS included) are cut to this many tokens"""
    reward_model: str | None = None
    """reward model used to score greedy responses before and after training; if unset, --reward-fn"""
    reward_fn: str | None = "embedded:arithmetic_reward"
    """reward function `module:function` for the eval score; None: report only the preference metrics"""
    max_new_tokens: int = 16
    """response length when sampling for the eval score"""
    eval_temperature: float = 0.0
    """sampling temperature for the eval score; 0 is greedy"""
    log_every: int = 5
    """log training metrics every this many optimizer steps"""
    micro_batch_size: int = 32
    """sequences per forward pass when evaluating"""
    fsdp: bool = False
    """shard the model(s) over the processes with FSDP2 (for models whose weights, gradients and AdamW state, 16 bytes
    per trained parameter, do not fit one GPU); without it several processes use DDP (a full copy each, faster)"""
    gradient_checkpointing: bool = False
    """recompute each transformer block's activations in the backward pass instead of storing them (less memory,
    about a third more compute)"""
    lora_r: int = 0
    """LoRA rank, through peft (0: train every weight); with LoRA, pi_ref is the policy with its adapter switched off"""
    lora_alpha: float | None = None
    """LoRA's alpha: the adapter adds (alpha / r) B A to each weight (default: 2 x --lora-r)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input; it acts only in train mode (--gradient-checkpointing) and adds noise to
    log-ratios"""
    lora_target_modules: list[str] | None = None
    """names of the modules to adapt, e.g. q_proj v_proj (default: every linear layer but the output head)"""
    generation_backend: Literal["auto", "dynamic", "static"] = "auto"
    """how to sample: "dynamic" is plain `generate`; "static" preallocates the KV cache and, on a GPU, runs a compiled
    decoding step as a CUDA graph (same distribution, faster; compiles once per shape); "auto": static on a GPU
    unless --fsdp, dynamic on CPU (where static gains nothing)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """autocast precision of policy and reference (both keep fp32 weights, so KL is 0 at step 0; a reward model is
    loaded in it); auto: bfloat16 on GPU, float32 on CPU"""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """also log metrics to tensorboard, wandb or trackio (must be installed), under the run name"""


def check_args(args: Args, world_size: int):
    """Reject bad flags with one clear line, before anything is loaded."""
    common.check_flags(args, world_size, batch_split=("grad_accum_steps",),
                       positive=("num_epochs", "grad_accum_steps", "num_eval_pairs", "max_prompt_length",
                                 "max_response_length", "max_new_tokens", "log_every", "micro_batch_size"))
    if args.beta <= 0:
        common.fail(f"--beta must be positive, got {args.beta}")


def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """The DPO loss, mean over pairs; log-probs are sequence sums:

        - ln sigmoid( beta * ( [ln pi(y_w) - ln pi_ref(y_w)] - [ln pi(y_l) - ln pi_ref(y_l)] ) )
    """
    return -F.logsigmoid(beta * ((logp_chosen - ref_chosen) - (logp_rejected - ref_rejected))).mean()


def tokenize_pairs(data, tokenizer, max_prompt_length: int, max_response_length: int):
    """Preference rows -> prompt ids as common.tokenize_prompts makes them, and chosen/rejected response ids
    (content tokens + EOS, as the RL scripts cut a sampled response), cut to max_response_length."""

    def encode(row):
        prompt, chosen, rejected = common.split_preference(row)
        text = common.render_prompt(prompt, tokenizer)
        ids = tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"][-max_prompt_length:]

        def response(content):
            return (tokenizer(content, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[
                :max_response_length]

        return {"prompt": prompt, "prompt_text": text, "input_ids": ids, "chosen_ids": response(chosen),
                "rejected_ids": response(rejected)}

    return data.map(encode, remove_columns=data.column_names)


def pair_batch(rows: list[dict], tokenizer, device) -> dict:
    """Left-padded prompts (twice), right-padded responses (chosen rows first, then rejected) and response masks
    (1 on each response's real tokens)."""
    query, query_mask = common.left_pad([r["input_ids"] for r in rows] * 2, tokenizer.pad_token_id, device)
    responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    width = max(len(s) for s in responses)
    return {"query": query, "query_mask": query_mask,
            "responses": common.right_pad(responses, width, tokenizer.pad_token_id, device),
            "mask": common.right_pad([[1] * len(s) for s in responses], width, 0, device)}


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of the response tokens' log-probs at temperature 1 (chosen rows first, then rejected; the two share
    their prompt's forward: group=2)."""
    return common.logprobs(model, batch["query"], batch["query_mask"], batch["responses"], batch["mask"], 1.0,
                           group=2).sum(1)


def pair_stats(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """[loss, accuracy, margin, chosen reward, rejected reward] of the implicit reward beta ln pi/pi_ref."""
    b = len(logp) // 2
    rewards = beta * (logp - logp_ref)
    margin = rewards[:b] - rewards[b:]
    loss = dpo_loss(logp[:b], logp[b:], logp_ref[:b], logp_ref[b:], beta)
    return torch.stack([loss, (margin > 0).float().mean(), margin.mean(), rewards[:b].mean(), rewards[b:].mean()])


STAT_NAMES = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")


def main(args: Args):
    rank, world_size, device = common.setup(args.seed, args)  # also the run name and the default --output-dir
    check_args(args, world_size)
    dtype, amp = common.precision(args.dtype, device)

    # Data first: a missing column or an empty split stops us before any model is loaded.
    train_rows, eval_rows = common.load_splits(args.dataset, args.train_split, args.eval_split, args.num_eval_pairs,
                                               args.batch_size, "preference")
    tokenizer = common.load_tokenizer(args.model)
    train_rows = tokenize_pairs(train_rows, tokenizer, args.max_prompt_length, args.max_response_length)
    eval_rows = tokenize_pairs(eval_rows, tokenizer, args.max_prompt_length, args.max_response_length)
    score = None
    if args.reward_model is not None or args.reward_fn is not None:
        score = common.make_scorer(args.reward_model, args.reward_fn, device, dtype)

    policy = common.load_model(args.model, device, lora=args)  # fp32 master weights; autocast runs it in `dtype`
    reference = None  # with LoRA, pi_ref is the policy with its adapter switched off (common.as_reference)
    if not args.lora_r:  # loaded as the policy: KL 0 at step 0
        reference = common.wrap(common.load_model(args.model, device).requires_grad_(False), device, dtype, args.fsdp)
    policy = common.wrap(policy, device, dtype, args.fsdp, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    num_steps = max(1, int(args.num_epochs * len(train_rows)) // args.batch_size)
    scheduler = common.make_scheduler(optimizer, args.lr_schedule, args.warmup_ratio, num_steps)
    start, saved = 0, {}
    if args.resume:  # weights, AdamW state, schedule and random states as the checkpoint left them
        start, saved = common.load_checkpoint(args.output_dir, policy, optimizer, scheduler)
    log = common.make_logger(args.output_dir, args.report_to, vars(args), device, start)

    @torch.no_grad()
    def eval_metrics() -> dict:
        """Held-out DPO loss and implicit-reward accuracy; the eval score of greedy responses."""
        totals, n, model, mine = torch.zeros(len(STAT_NAMES), device=device), 0, common.unwrap(policy), \
            common.shard(eval_rows)
        with amp(), common.gathered(policy), common.gathered(reference):  # (FSDP2: ranks' shares differ)
            pairs = max(1, args.micro_batch_size // 2)  # two sequences per pair
            for i in range(0, len(mine), pairs):
                rows = [mine[j] for j in range(i, min(i + pairs, len(mine)))]
                batch = pair_batch(rows, tokenizer, device)
                with common.as_reference(model, reference) as ref:
                    logp_ref = sequence_logprobs(ref, batch)
                totals += pair_stats(sequence_logprobs(model, batch), logp_ref, args.beta) * len(rows)
                n += len(rows)
            totals = common.all_reduce(torch.cat([totals, torch.tensor([float(n)], device=device)]))
            metrics = dict(zip(STAT_NAMES, (totals[:-1] / totals[-1].clamp(min=1)).tolist()))
            if score is not None:
                metrics |= common.score_held_out(policy, tokenizer, eval_rows, score, args.max_new_tokens,
                                                 args.eval_temperature, args.micro_batch_size, device)
        return metrics

    before = saved.get("before") or eval_metrics()
    common.print0("before training: eval " + "  ".join(f"{k} {v:.4g}" for k, v in before.items()))
    batches = common.prompt_batches(train_rows, args.batch_size, args.seed, skip=start)
    micro = args.batch_size // world_size // args.grad_accum_steps
    stats = saved.get("stats", [])  # the steps since the last log line
    for step in tqdm(range(start + 1, num_steps + 1), disable=rank != 0, desc=args.exp_name):
        rows = next(batches)
        for k in range(args.grad_accum_steps):
            batch = pair_batch(rows[k * micro:(k + 1) * micro], tokenizer, device)
            with torch.no_grad(), amp(), common.as_reference(policy, reference) as ref:
                logp_ref = sequence_logprobs(ref, batch)
            # chosen and rejected in one forward, so DDP sees one backward per forward
            with common.no_sync_unless(policy, k == args.grad_accum_steps - 1), amp():
                logp = sequence_logprobs(policy, batch)
                step_stats = pair_stats(logp, logp_ref, args.beta)
                (step_stats[0] / args.grad_accum_steps).backward()
            stats.append(step_stats.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == num_steps:
            log(dict(zip(STAT_NAMES, torch.stack(stats).mean(0))) | {"lr": scheduler.get_last_lr()[0]}, step)
            stats = []
        if args.save_every and step % args.save_every == 0:
            common.save_checkpoint(args, step, policy, optimizer, scheduler, {"before": before, "stats": stats})

    after = eval_metrics()
    common.print0("after training:  eval " + "  ".join(f"{k} {v:.4g}" for k, v in after.items()))
    log({f"eval_{k}_before": v for k, v in before.items()} | {f"eval_{k}_after": v for k, v in after.items()},
        num_steps)
    common.finish(policy, tokenizer, args, {"before": before, "after": after})


if __name__ == "__main__":
    main(tyro.cli(Args))
