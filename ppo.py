"""PPO for language models: the RLHF baseline, with the implementation details that make it work.

The same objective as every script here: maximise reward while staying close to the reference policy pi_ref,

    max_pi  E_{x~D, y~pi(.|x)} [ r(x, y) - kl_coef * KL( pi(.|x) || pi_ref(.|x) ) ] .

A response is an episode: the state s_t is the prompt plus the first t response tokens, the action a_t the next
token. The KL enters every token's reward, the score only the last one (the EOS):

    r_t = -kl_coef * (ln pi_t(a_t|s_t) - ln pi_ref(a_t|s_t))  + [t = last] * score(x, y)

A value model V (a scalar head on a transformer) gives generalised advantage estimates, backwards over the response
(`gae`), whitened over the whole global batch, response tokens only (`masked_whiten`):

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lambda A_{t+1},   returns_t = A_t + V(s_t)

Then several epochs of minibatch steps on the clipped surrogate (`policy_loss`) and the clipped value error
(`value_loss`), both means over the response tokens of the minibatch, rho_t = pi_theta(a_t|s_t) / pi_t(a_t|s_t):

    L_pi = max( -A_t rho_t,  -A_t clip(rho_t, 1 - eps, 1 + eps) )
    L_V  = 0.5 max( (V_theta(s_t) - R_t)^2,  (V_t(s_t) + clip(V_theta(s_t) - V_t(s_t), -eps_V, eps_V) - R_t)^2 )
    loss = L_pi + vf_coef * L_V

The value model starts from the reward model when there is one, else from the policy with a zero score head (V = 0).
Policy and value model sit in one module (`PolicyAndValue`) wrapped once by DDP, so both models' gradients are
synchronised (with --fsdp, FSDP2 shards each of the two on its own). ppo_plus.py and drpo.py are this file with a
different episode start (a reset); `diff` shows it.

Per iteration: roll out -> per-token rewards, GAE, whitening -> PPO epochs over minibatches.
"""

import os
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

import common


@dataclass
class Args:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """policy to train (hub id or local folder); it is also pi_ref, the frozen reference"""
    reward_model: str | None = None
    """reward model (AutoModelForSequenceClassification, one label; hub id or folder); if unset, --reward-fn. The
    value model starts from it, so it must share the policy's tokenizer"""
    reward_fn: str = "embedded:arithmetic_reward"
    """reward function `module:function` or `file.py:function`, called as TRL does: f(prompts, completions,
    **dataset_columns) -> list of floats"""
    dataset: str = "arithmetic"
    """hub id, local folder or .json/.jsonl/.csv/.parquet file in a TRL format; 'arithmetic' is the embedded task"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """split to evaluate on (if missing, the last rows of the train split are held out)"""
    num_eval_prompts: int = 150
    """number of held-out prompts evaluated before and after training"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (default: the script's file name); part of the default --run-name"""
    run_name: str | None = None
    """name of the run in every tracker and of its folder (default: <exp-name>__<seed>__<date-time>)"""
    output_dir: str | None = None
    """where the trained policy (an HF folder) and metrics.jsonl are written (default: runs/<run-name>)"""
    save_every: int = 0
    """write a checkpoint every this many iterations (0: none): weights, AdamW state, schedule, data position and
    every rank's random states, for --resume"""
    keep_checkpoints: int = 1
    """how many of the latest checkpoints to keep in --output-dir"""
    resume: bool = False
    """continue from the latest checkpoint in --output-dir, with the same flags (metrics.jsonl is continued)"""
    seed: int = 1
    """random seed (each process adds its rank)"""
    num_iterations: int = 12
    """training iterations: roll out a batch with pi_t, then PPO epochs on it"""
    batch_size: int = 16
    """prompts (= episodes) per iteration over all processes; paper (TL;DR): 512"""
    num_ppo_epochs: int = 2
    """passes over each iteration's episodes; paper: 4"""
    num_minibatches: int = 2
    """optimizer steps per epoch (the episodes are split into this many minibatches)"""
    grad_accum_steps: int = 1
    """micro-batches per minibatch (lowers memory, same result)"""
    lr: float = 1e-5
    """AdamW learning rate of policy and value model; paper (TL;DR): 3e-6"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate schedule after warm-up: linear or cosine decay to 0, or constant"""
    warmup_ratio: float = 0.0
    """fraction of the optimizer steps over which the learning rate warms up linearly from 0"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    kl_coef: float = 0.05
    """coefficient of the per-token KL-to-reference penalty in the rewards"""
    gamma: float = 1.0
    """discount factor of GAE"""
    lam: float = 0.95
    """lambda of GAE"""
    cliprange: float = 0.2
    """eps: the policy ratio is clipped to [1 - eps, 1 + eps]"""
    cliprange_value: float = 0.2
    """eps_V: the value moves at most this far from its rollout value before the loss clips it"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scale only) over the batch before GAE (the authors' TL;DR PPO and DR-PO: on)"""
    temperature: float = 0.7
    """sampling temperature for training (log-probs use the same temperature)"""
    eval_temperature: float = 0.0
    """sampling temperature for evaluation; 0 is greedy"""
    max_new_tokens: int = 16
    """response length; responses are cut after their first EOS; paper (TL;DR): 53"""
    max_prompt_length: int = 512
    """prompts are left-truncated to this many tokens"""
    eos_penalty: float | None = -1.0
    """score given to a response that has no EOS within max_new_tokens (None: no penalty, the score as it is)"""
    micro_batch_size: int = 32
    """sequences per forward pass when computing log-probs and values without gradient and when evaluating"""
    fsdp: bool = False
    """shard every model over the processes with FSDP2 (for models whose weights, gradients and AdamW state, 16 bytes
    per trained parameter, do not fit one GPU); without it several processes use DDP (a full copy each, faster)"""
    gradient_checkpointing: bool = False
    """recompute each transformer block's activations in the backward pass instead of storing them (less memory,
    about a third more compute in the update; sampling is unaffected)"""
    generation_batch_size: int | None = None
    """sequences per generate call, which bounds the KV cache's memory (None: this process's whole batch at once)"""
    generation_backend: Literal["auto", "dynamic", "static"] = "auto"
    """how to sample: "dynamic" is plain `generate`; "static" preallocates the KV cache and, on a GPU, runs a compiled
    decoding step as a CUDA graph (same distribution, faster; compiles once per shape); "auto": static on a GPU
    unless --fsdp, dynamic on CPU (where static gains nothing)"""
    lora_r: int = 0
    """LoRA rank, through peft (0: train every weight); with LoRA, pi_ref is the policy with its adapter switched off"""
    lora_alpha: float | None = None
    """LoRA's alpha: the adapter adds (alpha / r) B A to each weight (default: 2 x --lora-r)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input; it acts only in train mode (--gradient-checkpointing) and adds noise to
    log-ratios"""
    lora_target_modules: list[str] | None = None
    """names of the modules to adapt, e.g. q_proj v_proj (default: every linear layer but the output head)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """autocast precision of every model (weights stay fp32, the reward model's are loaded in it); auto: bfloat16
    on GPU, float32 on CPU"""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """also log metrics to tensorboard, wandb or trackio (must be installed), under the run name"""


def check_args(args: Args, world_size: int):
    """Reject bad flag combinations with one clear line, before anything is loaded."""
    common.check_flags(args, world_size, batch_split=("num_minibatches", "grad_accum_steps"),
                       positive=("num_iterations", "num_ppo_epochs", "num_minibatches", "grad_accum_steps",
                                 "max_new_tokens", "micro_batch_size", "num_eval_prompts", "max_prompt_length"))
    if args.temperature <= 0:
        common.fail(f"--temperature must be positive (log-probs divide by it), got {args.temperature}")
    for flag in ("gamma", "lam"):
        if not 0 <= getattr(args, flag) <= 1:
            common.fail(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")
    for flag in ("cliprange", "cliprange_value", "vf_coef"):
        if getattr(args, flag) < 0:
            common.fail(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")


# ----------------------------------------------------------------------------------------------------------------
# The PPO pieces, each next to its equation in the module docstring
# ----------------------------------------------------------------------------------------------------------------
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the entries where mask is 1, over all processes (the global batch); 0 where mask is 0.
    The variance is the unbiased one. shift_mean=False adds the mean back (scales only; used for rewards)."""
    mask = mask.float()
    total, count = common.all_reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = total / count
    var = common.all_reduce(((x - mean) ** 2 * mask).sum()) / (count - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates [B, R], backwards over the response tokens (0 where mask is 0):

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lambda A_{t+1}

    with r and V taken as 0 after the last response token (the episode ends at the EOS)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t], next_value = next_advantage, values[:, t]
    return advantages * mask


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, eps: float) -> tuple:
    """The clipped surrogate per token, max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) with rho = exp(logp - logp_old).
    Returns (loss [B, R], whether the clipped term was the larger [B, R])."""
    ratio = torch.exp(logp - logp_old)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, eps: float) -> tuple:
    """The clipped value error per token, 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2).
    Returns (loss [B, R], whether the clipped term was the larger [B, R])."""
    unclipped = (values - returns) ** 2
    clipped = (values_old + (values - values_old).clamp(-eps, eps) - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the entries where mask is 1 (this process only)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# Models, rollout, advantages, update
# ----------------------------------------------------------------------------------------------------------------
class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module, so that one DDP wrapper synchronises both models' gradients
    (common.wrap with fsdp shards each model inside on its own)."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, query, query_mask, response, response_mask, temperature: float) -> tuple:
        """(ln pi(a_t|s_t), the entropy of pi(.|s_t), V(s_t)) at each response token ([B, R] each)."""
        logp, entropy = common.logprobs(self.policy, query, query_mask, response, response_mask, temperature,
                                        entropy=True)
        # V(s_t) before each response token; the state after the last one ends the episode: not fed
        values = common.scalar_head(self.value, torch.cat([query, response[:, :-1]], 1),
                                    torch.cat([query_mask, response_mask[:, :-1]], 1))
        return logp, entropy, values[:, query.shape[1] - 1:].float()


def load_value_model(args: Args, device: torch.device) -> torch.nn.Module:
    """The value model: the reward model if there is one, else the policy's transformer with a zero score head.
    With LoRA it gets its own adapter, and its score head trains in full."""
    value = common.load_model(args.reward_model or args.model, device, cls=AutoModelForSequenceClassification,
                              lora=args, num_labels=1)
    if args.reward_model is None:
        for weight in value.score.parameters():  # (with LoRA: the head and its trained copy)
            torch.nn.init.zeros_(weight)
    return value


@torch.no_grad()
def rollout(model, reference, tokenizer, rows: list[dict], score, args: Args, amp) -> dict:
    """One episode per prompt: pi_t's response, its pi_t and pi_ref log-probs per token, V(s_t), and the score."""
    model = common.unwrap(model)
    device = next(model.parameters()).device
    with amp():
        query, query_mask = common.left_pad([r["input_ids"] for r in rows], tokenizer.pad_token_id, device)
        responses = common.generate(model.policy, tokenizer, query, query_mask, args.max_new_tokens,
                                    args.temperature, args.generation_batch_size)
        mask = common.eos_mask(responses, tokenizer.eos_token_id)
        logp_old, values = [], []
        for i in range(0, len(query), args.micro_batch_size):
            s = slice(i, i + args.micro_batch_size)
            logp, _, v = model(query[s], query_mask[s], responses[s], mask[s], args.temperature)
            logp_old.append(logp)
            values.append(v * mask[s])
        with common.as_reference(model.policy, reference) as ref:
            logp_ref = common.logprobs(ref, query, query_mask, responses, mask, args.temperature, args.micro_batch_size)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    ended = common.has_eos(responses, mask, tokenizer.eos_token_id)
    scores = score(rows, texts)
    if args.eos_penalty is not None:  # a response that never ended gets the fixed penalty instead of its score
        scores = torch.where(ended, scores, args.eos_penalty)
    return dict(query=query, query_mask=query_mask, responses=responses, mask=mask, logp_old=torch.cat(logp_old),
                logp_ref=logp_ref, values=torch.cat(values), scores=scores, ended=ended.float())


def advantages_and_returns(batch: dict, args: Args) -> dict:
    """Per-token rewards (KL penalty on every response token, score added at the last), GAE, returns, and the
    advantages whitened over the global batch's response tokens."""
    mask = batch["mask"].float()
    rewards = -args.kl_coef * (batch["logp_old"] - batch["logp_ref"]) * mask
    last = batch["mask"].sum(1) - 1  # the EOS, or the last token when there is none
    rewards[torch.arange(len(rewards)), last] += batch["scores"]
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages = gae(rewards, batch["values"], mask, args.gamma, args.lam)
    returns = advantages + batch["values"] * mask
    return dict(rewards=rewards, advantages=masked_whiten(advantages, mask), returns=returns)


def update(model, optimizer, scheduler, batch: dict, args: Args, amp) -> dict:
    """PPO epochs over this rank's episodes, in minibatches of micro-batches.

    The losses are sums over response tokens divided by the response tokens of the whole minibatch over all ranks
    (times the number of ranks, which DDP's gradient average divides out), so any split into processes and
    micro-batches gives the same gradient as one process on the global minibatch."""
    b, device = len(batch["scores"]), batch["scores"].device
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    minibatch, micro = b // args.num_minibatches, b // args.num_minibatches // args.grad_accum_steps
    stats = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy", "ratio")}
    for _ in range(args.num_ppo_epochs):
        order = torch.randperm(b, device=device)
        for start in range(0, b, minibatch):
            tokens = common.all_reduce(batch["mask"][order[start:start + minibatch]].sum().float())
            for step, micro_start in enumerate(range(start, start + minibatch, micro)):
                i = order[micro_start:micro_start + micro]
                mask = batch["mask"][i].float()
                with common.no_sync_unless(model, step == args.grad_accum_steps - 1), amp():
                    logp, entropy, values = model(batch["query"][i], batch["query_mask"][i], batch["responses"][i],
                                                  batch["mask"][i], args.temperature)
                    pg, pg_clipped = policy_loss(logp, batch["logp_old"][i], batch["advantages"][i], args.cliprange)
                    vf, vf_clipped = value_loss(values, batch["values"][i], batch["returns"][i],
                                                args.cliprange_value)
                    loss = ((pg + args.vf_coef * vf) * mask).sum() * world / tokens
                    loss.backward()
                with torch.no_grad():
                    log_ratio = logp - batch["logp_old"][i]
                    for key, value in (("pg_loss", pg), ("vf_loss", vf), ("clipfrac", pg_clipped.float()),
                                       ("vf_clipfrac", vf_clipped.float()), ("approx_kl", 0.5 * log_ratio ** 2),
                                       ("entropy", entropy), ("ratio", log_ratio.exp())):
                        stats[key].append(masked_mean(value, mask))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return {k: torch.stack(v).mean() for k, v in stats.items()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the response tokens: 1 is a perfect value model."""
    mask = mask.float()

    def var(x):
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    return 1 - var(returns - values) / var(returns).clamp(min=1e-8)


def main(args: Args):
    rank, world_size, device = common.setup(args.seed, args)  # also the run name and the default --output-dir
    check_args(args, world_size)
    dtype, amp = common.precision(args.dtype, device)

    # Data first: a missing column or an empty split stops us before any model is loaded.
    train_rows, eval_rows = common.load_splits(args.dataset, args.train_split, args.eval_split, args.num_eval_prompts,
                                               args.batch_size)
    score = common.make_scorer(args.reward_model, args.reward_fn, device, dtype, args.fsdp)
    tokenizer = common.load_tokenizer(args.model)
    train_rows = common.tokenize_prompts(train_rows, tokenizer, args.max_prompt_length)
    eval_rows = common.tokenize_prompts(eval_rows, tokenizer, args.max_prompt_length)

    # fp32 master weights for the trained models; autocast runs them in `dtype`
    model = PolicyAndValue(common.load_model(args.model, device, lora=args), load_value_model(args, device))
    model = common.wrap(model, device, dtype, args.fsdp, args.gradient_checkpointing)
    reference = None  # with LoRA, pi_ref is the policy with its adapter off (common.as_reference)
    if not args.lora_r:  # loaded as the policy: KL 0 at step 0
        reference = common.wrap(common.load_model(args.model, device).requires_grad_(False), device, dtype, args.fsdp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    scheduler = common.make_scheduler(optimizer, args.lr_schedule, args.warmup_ratio,
                                      args.num_iterations * args.num_ppo_epochs * args.num_minibatches)
    start, saved = 0, {}
    if args.resume:  # weights, AdamW state, schedule and random states as the checkpoint left them
        start, saved = common.load_checkpoint(args.output_dir, model, optimizer, scheduler)
    log = common.make_logger(args.output_dir, args.report_to, vars(args), device, start)

    def eval_metrics():  # always from the bare prompt
        with amp():
            return common.score_held_out(common.unwrap(model).policy, tokenizer, eval_rows, score, args.max_new_tokens,
                                         args.eval_temperature, args.micro_batch_size, device)

    before = saved.get("before") or eval_metrics()
    common.print0(f"before training: eval score {before['score']:.3f} (eos fraction {before['eos_fraction']:.2f})")
    batches = common.prompt_batches(train_rows, args.batch_size, args.seed, skip=start)
    for iteration in tqdm(range(start + 1, args.num_iterations + 1), disable=rank != 0, desc=args.exp_name):
        # 1. Roll out one episode per prompt with pi_t; score it; log-probs and values per token.
        batch = rollout(model, reference, tokenizer, next(batches), score, args, amp)
        # 2. Per-token rewards, GAE, returns; whiten the advantages over the global batch.
        batch |= advantages_and_returns(batch, args)
        # 3. PPO epochs of clipped policy and value losses over minibatches.
        stats = update(model, optimizer, scheduler, batch, args, amp)
        # 4. Log the mean over all processes.
        metrics = {"score": batch["scores"].mean(), "kl": (batch["logp_old"] - batch["logp_ref"]).sum(1).mean(),
                   "eos_fraction": batch["ended"].mean(), "length": batch["mask"].sum(1).float().mean(),
                   "explained_variance": explained_variance(batch["values"], batch["returns"], batch["mask"]),
                   **stats}
        log(metrics | {"lr": scheduler.get_last_lr()[0]}, iteration)
        if args.save_every and iteration % args.save_every == 0:
            common.save_checkpoint(args, iteration, model, optimizer, scheduler, {"before": before})

    after = eval_metrics()
    common.print0(f"after training:  eval score {after['score']:.3f} (eos fraction {after['eos_fraction']:.2f})")
    log({f"eval_{k}_before": v for k, v in before.items()} | {f"eval_{k}_after": v for k, v in after.items()},
        args.num_iterations)
    common.finish(common.unwrap(model).policy, tokenizer, args, {"before": before, "after": after})


if __name__ == "__main__":
    main(tyro.cli(Args))
