"""Reward model: a scalar score r(x, y) trained on preference pairs, step 2 of the RLHF pipeline.

Under the Bradley-Terry model a human prefers y_w to y_l with probability sigmoid(r(x, y_w) - r(x, y_l)); the
reward model maximises the likelihood of the observed preferences,

    min_phi  E_{(x, y_w, y_l)~D} [ - ln sigmoid( r_phi(x, y_w) - r_phi(x, y_l) ) ]          (`pairwise_loss`)

r_phi is an AutoModelForSequenceClassification with one label, initialised from a policy (usually the SFT model),
read at the last real token of the text. The text is exactly what the RL scripts hand to a reward model
(common.reward_model_texts: the conversation through the chat template, or prompt text + response), and the
held-out pairwise accuracy is computed through common.reward_model_scores, the function the RL scripts score with.
Scores are only defined up to a constant; `--normalize` shifts them so the reference (chosen) responses of the
training data score 0 on average (stored as `reward_offset` in the model's config, which common.reward_model_scores
adds: the score heads of most architectures have no bias). Saves an HF folder that every RL script takes as
--reward-model.

    python reward.py --model runs/sft                       # the embedded arithmetic preferences, offline on CPU
    torchrun --nproc_per_node 8 reward.py --model runs/sft --dataset trl-lib/tldr-preference ...
"""

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

import common


@dataclass
class Args:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """model to start from (hub id or folder; usually the SFT model): its body is kept, a one-label score head is
    added (or kept, when it already is a reward model)"""
    dataset: str = "arithmetic-preferences"
    """hub id, local folder or .json/.jsonl/.csv/.parquet file with prompt/chosen/rejected (or chosen/rejected with
    an implicit prompt), plain or conversational; 'arithmetic-preferences' is the embedded task"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """split to measure the held-out pairwise accuracy on (if missing, the last rows of train are held out)"""
    num_eval_pairs: int = 150
    """number of held-out pairs"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (default: the script's file name); part of the default --run-name"""
    run_name: str | None = None
    """name of the run in every tracker and of its folder (default: <exp-name>__<seed>__<date-time>)"""
    output_dir: str | None = None
    """where the reward model (an HF folder) and metrics.jsonl are written (default: runs/<run-name>)"""
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
    """passes over the training pairs (fractions allowed); paper (TL;DR): 1"""
    batch_size: int = 8
    """pairs per optimizer step over all processes"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step (lowers memory, same result)"""
    lr: float = 3e-5
    """AdamW learning rate"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate schedule after warm-up: linear or cosine decay to 0, or constant"""
    warmup_ratio: float = 0.0
    """fraction of the optimizer steps over which the learning rate warms up linearly from 0"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    normalize: bool = False
    """after training, shift the scores so the chosen responses of (up to --num-normalize) training rows score 0 on
    average"""
    num_normalize: int = 256
    """training rows used by --normalize"""
    log_every: int = 5
    """log the training loss every this many optimizer steps"""
    micro_batch_size: int = 32
    """texts per forward pass when scoring without gradient"""
    fsdp: bool = False
    """shard the model(s) over the processes with FSDP2 (for models whose weights, gradients and AdamW state, 16 bytes
    per trained parameter, do not fit one GPU); without it several processes use DDP (a full copy each, faster)"""
    gradient_checkpointing: bool = False
    """recompute each transformer block's activations in the backward pass instead of storing them (less memory,
    about a third more compute)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """autocast precision (auto: bfloat16 on GPU, float32 on CPU); the weights stay float32"""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """also log metrics to tensorboard, wandb or trackio (must be installed), under the run name"""


def check_args(args: Args, world_size: int):
    """Reject bad flags with one clear line, before anything is loaded."""
    common.check_flags(args, world_size, batch_split=("grad_accum_steps",),
                       positive=("num_epochs", "grad_accum_steps", "num_eval_pairs", "num_normalize", "log_every",
                                 "micro_batch_size"))


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood, mean over pairs: -ln sigmoid(r(chosen) - r(rejected))."""
    return -F.logsigmoid(chosen - rejected).mean()


def preference_texts(data, tokenizer):
    """Preference rows -> {'chosen', 'rejected'}: the two texts the reward model reads, rendered exactly as the RL
    scripts render a prompt and a sampled response for it (common.render_prompt, common.reward_model_texts)."""

    def encode(row):
        prompt, chosen, rejected = common.split_preference(row)
        text = common.render_prompt(prompt, tokenizer)
        chosen_text, rejected_text = common.reward_model_texts([prompt] * 2, [text] * 2, [chosen, rejected], tokenizer)
        return {"chosen": chosen_text, "rejected": rejected_text}

    return data.map(encode, remove_columns=data.column_names)


class LastTokenScore(torch.nn.Module):
    """The reward model as one module (so DistributedDataParallel sees one forward): the scalar head read at each
    text's last real token, exactly as common.reward_model_scores reads it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        values = common.scalar_head(self.model, input_ids, attention_mask)
        return values.gather(1, common.last_token_index(attention_mask)[:, None]).squeeze(1).float()


@torch.no_grad()
def accuracy(model, tokenizer, rows, micro_batch: int, device) -> dict:
    """Held-out pairwise accuracy (ties count half) and mean margin, scored by common.reward_model_scores."""
    with common.gathered(model):  # on every rank, even one with no rows (FSDP2 gathers the model here)
        if len(rows) == 0:  # more processes than held-out pairs
            chosen = rejected = torch.zeros(0, device=device)
        else:
            chosen = common.reward_model_scores(model, tokenizer, rows["chosen"], micro_batch)
            rejected = common.reward_model_scores(model, tokenizer, rows["rejected"], micro_batch)
    total = torch.stack([((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum(),
                         (chosen - rejected).sum(), chosen.sum(), torch.tensor(float(len(rows)), device=device)])
    total = common.all_reduce(total)
    n = total[3].clamp(min=1)
    return {"accuracy": (total[0] / n).item(), "margin": (total[1] / n).item(), "chosen_score": (total[2] / n).item()}


def main(args: Args):
    rank, world_size, device = common.setup(args.seed, args)  # also the run name and the default --output-dir
    check_args(args, world_size)
    dtype, amp = common.precision(args.dtype, device)

    # Data first: a missing column or an empty split stops us before any model is loaded.
    train_rows, eval_rows = common.load_splits(args.dataset, args.train_split, args.eval_split, args.num_eval_pairs,
                                               args.batch_size, "preference")
    tokenizer = common.load_tokenizer(args.model)
    tokenizer.padding_side = "right"  # as common.make_scorer loads it
    train_rows = preference_texts(train_rows, tokenizer)
    eval_rows = common.shard(preference_texts(eval_rows, tokenizer))

    reward_model = common.load_model(args.model, device, cls=AutoModelForSequenceClassification, num_labels=1)
    model = common.wrap(LastTokenScore(reward_model), device, dtype, args.fsdp, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    num_steps = max(1, int(args.num_epochs * len(train_rows)) // args.batch_size)
    scheduler = common.make_scheduler(optimizer, args.lr_schedule, args.warmup_ratio, num_steps)
    start, saved = 0, {}
    if args.resume:  # weights, AdamW state, schedule and random states as the checkpoint left them
        start, saved = common.load_checkpoint(args.output_dir, model, optimizer, scheduler)
    log = common.make_logger(args.output_dir, args.report_to, vars(args), device, start)

    def eval_metrics() -> dict:
        with amp():
            return accuracy(reward_model, tokenizer, eval_rows, args.micro_batch_size, device)

    before = saved.get("before") or eval_metrics()
    common.print0(f"before training: held-out accuracy {before['accuracy']:.3f}")
    batches = common.prompt_batches(train_rows, args.batch_size, args.seed, skip=start)
    micro = args.batch_size // world_size // args.grad_accum_steps
    stats = saved.get("stats", [])  # the steps since the last log line
    for step in tqdm(range(start + 1, num_steps + 1), disable=rank != 0, desc=args.exp_name):
        rows = next(batches)
        for k in range(args.grad_accum_steps):
            part = rows[k * micro:(k + 1) * micro]
            # chosen and rejected texts in one right-padded batch: one forward, one backward
            enc = tokenizer([r["chosen"] for r in part] + [r["rejected"] for r in part], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(device)
            with common.no_sync_unless(model, k == args.grad_accum_steps - 1), amp():
                scores = model(enc["input_ids"], enc["attention_mask"])
                loss = pairwise_loss(scores[:len(part)], scores[len(part):])
                (loss / args.grad_accum_steps).backward()
            margin = (scores[:len(part)] - scores[len(part):]).detach()
            stats.append(torch.stack([loss.detach(), (margin > 0).float().mean(), margin.mean()]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == num_steps:
            metrics = dict(zip(("loss", "accuracy", "margin"), torch.stack(stats).mean(0)))
            log(metrics | {"lr": scheduler.get_last_lr()[0]}, step)
            stats = []
        if args.save_every and step % args.save_every == 0:
            common.save_checkpoint(args, step, model, optimizer, scheduler, {"before": before, "stats": stats})

    after = eval_metrics()
    common.print0(f"after training:  held-out accuracy {after['accuracy']:.3f} (margin {after['margin']:.3f})")
    if args.normalize:
        # the mean score of the reference responses, over all ranks, becomes 0
        normalize_rows = common.shard(train_rows.select(range(min(args.num_normalize, len(train_rows)))))
        with amp(), torch.no_grad():
            scores = common.reward_model_scores(reward_model, tokenizer, normalize_rows["chosen"],
                                                args.micro_batch_size)
        mean = common.all_reduce(scores.mean(), mean=True).item()
        reward_model.config.reward_offset = getattr(reward_model.config, "reward_offset", 0.0) - mean
        after["chosen_score"] -= mean  # a shift: accuracy and margins are unchanged
        common.print0(f"normalized: offset {reward_model.config.reward_offset:.4f}, held-out chosen score "
                      f"{after['chosen_score']:.3f}")
    log({f"eval_{k}_before": v for k, v in before.items()} | {f"eval_{k}_after": v for k, v in after.items()},
        num_steps)
    common.finish(reward_model, tokenizer, args, {"before": before, "after": after}, "reward model")


if __name__ == "__main__":
    main(tyro.cli(Args))
