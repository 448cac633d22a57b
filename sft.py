"""SFT: supervised fine-tuning on demonstrations, step 1 of the RLHF pipeline (SFT -> reward model -> RL).

Maximum likelihood of the demonstrated response y given the prompt x, prompt tokens masked out:

    min_theta  E_{(x, y)~D} [ - sum_t ln pi_theta(y_t | x, y_<t) ] / (number of response tokens)

The sequences are exactly those the RL scripts see: the prompt rendered as common.tokenize_prompts renders it (chat
template with the generation prompt for conversations) followed by the response tokens and EOS, so the SFT model
learns to end its answers where the RL scripts cut them. Labels are -100 on the prompt and on padding (`sft_batch`);
the loss is the mean next-token cross-entropy over the response tokens (`sft_loss`). Saves an HF folder that every
RL script takes as --model.

    python sft.py                                           # the embedded arithmetic task, offline on CPU
    torchrun --nproc_per_node 8 sft.py --model EleutherAI/pythia-1b-deduped --dataset trl-lib/tldr ...
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
    """model to fine-tune (hub id or local folder)"""
    dataset: str = "arithmetic"
    """hub id, local folder or .json/.jsonl/.csv/.parquet file: prompt/completion (or messages, or prompt/chosen),
    plain or conversational; 'arithmetic' is the embedded task"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """split to evaluate on (if missing, the last rows of the train split are held out)"""
    num_eval_prompts: int = 150
    """number of held-out rows for the eval loss and the eval score"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (default: the script's file name); part of the default --run-name"""
    run_name: str | None = None
    """name of the run in every tracker and of its folder (default: <exp-name>__<seed>__<date-time>)"""
    output_dir: str | None = None
    """where the fine-tuned model (an HF folder) and metrics.jsonl are written (default: runs/<run-name>)"""
    save_every: int = 0
    """write a checkpoint every this many optimizer steps (0: none): weights, AdamW state, schedule, data position
    and every rank's random states, for --resume"""
    keep_checkpoints: int = 1
    """how many of the latest checkpoints to keep in --output-dir"""
    resume: bool = False
    """continue from the latest checkpoint in --output-dir, with the same flags (metrics.jsonl is continued)"""
    seed: int = 1
    """random seed"""
    num_epochs: float = 0.03
    """passes over the training rows (fractions allowed); paper (TL;DR): 1"""
    batch_size: int = 8
    """sequences per optimizer step over all processes"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step (lowers memory, same result up to the per-micro-batch token mean)"""
    lr: float = 3e-5
    """AdamW learning rate"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate schedule after warm-up: linear or cosine decay to 0, or constant"""
    warmup_ratio: float = 0.0
    """fraction of the optimizer steps over which the learning rate warms up linearly from 0"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    max_prompt_length: int = 512
    """prompts are left-truncated to this many tokens (as in the RL scripts)"""
    max_response_length: int = 64
    """responses (EOS included) are cut to this many tokens; paper (TL;DR): 53"""
    reward_model: str | None = None
    """reward model used to score greedy responses before and after training; if unset, --reward-fn"""
    reward_fn: str | None = "embedded:arithmetic_reward"
    """reward function `module:function` for the eval score; None: report only the eval loss"""
    max_new_tokens: int = 16
    """response length when sampling for the eval score"""
    eval_temperature: float = 0.0
    """sampling temperature for the eval score; 0 is greedy"""
    log_every: int = 5
    """log the training loss every this many optimizer steps"""
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
    """autocast precision (auto: bfloat16 on GPU, float32 on CPU); the weights stay float32"""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """also log metrics to tensorboard, wandb or trackio (must be installed), under the run name"""


def check_args(args: Args, world_size: int):
    """Reject bad flags with one clear line, before anything is loaded."""
    common.check_flags(args, world_size, batch_split=("grad_accum_steps",),
                       positive=("num_epochs", "grad_accum_steps", "max_prompt_length", "max_response_length",
                                 "num_eval_prompts", "max_new_tokens", "log_every", "micro_batch_size"))


def sft_batch(rows: list[dict], pad_id: int, max_response_length: int, device=None) -> dict:
    """Right-padded prompt + response ids, attention mask, and labels that are -100 on prompt tokens and padding
    (the response tokens, EOS included, keep their ids). Rows come from common.tokenize_prompts."""
    sequences = [r["input_ids"] + r["reference_ids"][:max_response_length] for r in rows]
    width = max(len(s) for s in sequences)
    input_ids = common.right_pad(sequences, width, pad_id, device)
    attention_mask = common.right_pad([[1] * len(s) for s in sequences], width, 0, device)
    labels = common.right_pad([[-100] * len(r["input_ids"]) + s[len(r["input_ids"]):] for r, s in
                               zip(rows, sequences)], width, -100, device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100: logits[:, t] predicts
    labels[:, t + 1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def forward_loss(model, batch: dict) -> torch.Tensor:
    """The SFT loss of one batch from `sft_batch`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sft_loss(logits, batch["labels"])


@torch.no_grad()
def eval_loss(model, rows, tokenizer, args: Args, amp) -> float:
    """Token-weighted mean SFT loss over the held-out rows (this rank's share, averaged over ranks)."""
    device = model.device
    total = torch.zeros(2, device=device)
    for i in range(0, len(rows), args.micro_batch_size):
        batch = sft_batch([rows[j] for j in range(i, min(i + args.micro_batch_size, len(rows)))],
                          tokenizer.pad_token_id, args.max_response_length, device)
        with amp():
            loss = forward_loss(model, batch)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        total += torch.stack([loss.float() * tokens, tokens.float()])
    total = common.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def main(args: Args):
    rank, world_size, device = common.setup(args.seed, args)  # also the run name and the default --output-dir
    check_args(args, world_size)
    dtype, amp = common.precision(args.dtype, device)

    # Data first: a missing column or an empty split stops us before any model is loaded.
    train_rows, eval_rows = common.load_splits(args.dataset, args.train_split, args.eval_split, args.num_eval_prompts,
                                               args.batch_size, "reference")
    tokenizer = common.load_tokenizer(args.model)
    train_rows = common.tokenize_prompts(train_rows, tokenizer, args.max_prompt_length)
    eval_rows = common.tokenize_prompts(eval_rows, tokenizer, args.max_prompt_length)
    score = None
    if args.reward_model is not None or args.reward_fn is not None:
        score = common.make_scorer(args.reward_model, args.reward_fn, device, dtype)

    model = common.wrap(common.load_model(args.model, device, lora=args), device, dtype, args.fsdp,
                        args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    num_steps = max(1, int(args.num_epochs * len(train_rows)) // args.batch_size)
    scheduler = common.make_scheduler(optimizer, args.lr_schedule, args.warmup_ratio, num_steps)
    start, saved = 0, {}
    if args.resume:  # weights, AdamW state, schedule and random states as the checkpoint left them
        start, saved = common.load_checkpoint(args.output_dir, model, optimizer, scheduler)
    log = common.make_logger(args.output_dir, args.report_to, vars(args), device, start)

    def eval_metrics() -> dict:
        with common.gathered(model):  # under FSDP2: whole, as the ranks' shares of rows differ
            metrics = {"loss": eval_loss(common.unwrap(model), common.shard(eval_rows), tokenizer, args, amp)}
        if score is not None:
            with amp():
                metrics |= common.score_held_out(model, tokenizer, eval_rows, score, args.max_new_tokens,
                                                 args.eval_temperature, args.micro_batch_size, device)
        return metrics

    before = saved.get("before") or eval_metrics()
    common.print0("before training: eval " + "  ".join(f"{k} {v:.4g}" for k, v in before.items()))
    batches = common.prompt_batches(train_rows, args.batch_size, args.seed, skip=start)
    micro = args.batch_size // world_size // args.grad_accum_steps
    losses = saved.get("losses", [])  # the steps since the last log line
    for step in tqdm(range(start + 1, num_steps + 1), disable=rank != 0, desc=args.exp_name):
        rows = next(batches)
        for k in range(args.grad_accum_steps):
            batch = sft_batch(rows[k * micro:(k + 1) * micro], tokenizer.pad_token_id, args.max_response_length,
                              device)
            with common.no_sync_unless(model, k == args.grad_accum_steps - 1), amp():
                loss = forward_loss(model, batch)
                (loss / args.grad_accum_steps).backward()
            losses.append(loss.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == num_steps:
            log({"loss": torch.stack(losses).mean(), "lr": scheduler.get_last_lr()[0]}, step)
            losses = []
        if args.save_every and step % args.save_every == 0:
            common.save_checkpoint(args, step, model, optimizer, scheduler, {"before": before, "losses": losses})

    after = eval_metrics()
    common.print0("after training:  eval " + "  ".join(f"{k} {v:.4g}" for k, v in after.items()))
    log({f"eval_{k}_before": v for k, v in before.items()} | {f"eval_{k}_after": v for k, v in after.items()},
        num_steps)
    common.finish(model, tokenizer, args, {"before": before, "after": after}, "model")


if __name__ == "__main__":
    main(tyro.cli(Args))
