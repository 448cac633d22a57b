"""REBEL: REinforcement learning via regressing relative rewards (Gao et al., 2024).

RLHF asks for a policy that maximises reward while staying close to a reference policy pi_ref:

    max_pi  E_{x~D, y~pi(.|x)} [ r(x, y) ]  -  (1/eta) KL( pi(.|x) || pi_ref(.|x) )

Mirror descent on this objective from the current policy pi_t has the closed form
pi_{t+1}(y|x) ∝ pi_t(y|x) exp(eta r(x, y)), whose partition function Z(x) is intractable. REBEL removes it by
taking the difference of two responses y, y' to the same prompt: Z(x) cancels, and pi_{t+1} is the solution of a
least-squares regression of the *relative* log-ratio onto the *relative* reward,

    pi_{t+1} = argmin_theta  E_{x, y, y'} ( (1/eta) [ ln pi_theta(y|x)/pi_t(y|x) - ln pi_theta(y'|x)/pi_t(y'|x) ]
                                            - [ r(x, y) - r(x, y') ] )^2 .

We minimise it multiplied through by eta^2 (as the authors' code does); see `rebel_loss`. No value model, no
clipping, no advantage estimation: two samples per prompt and a squared error. Here y and y' both come from pi_t by
default; `--mu` takes y' from pi_ref or from the dataset's reference response instead (the paper's general form), or
`--mu best-of-n` samples N responses from pi_t and pairs each prompt's best with its worst (the authors'
UltraFeedback setting, N = 5), dropping a prompt whose best and worst are the same tokens.
The KL to pi_ref enters through the reward, r = score - kl_coef * sum_tokens (ln pi_t - ln pi_ref).

Per iteration: sample pairs -> score them -> K passes of regression over the pairs in minibatches.

    python rebel.py                                        # the embedded arithmetic task, offline on CPU
    torchrun --nproc_per_node 8 rebel.py --model ... --reward-model ... --dataset ...
"""

import os
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm

import common


@dataclass
class Args:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """policy to train (hub id or local folder); it is also pi_ref, the frozen reference"""
    reward_model: str | None = None
    """reward model (AutoModelForSequenceClassification, one label; hub id or folder); if unset, --reward-fn"""
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
    num_iterations: int = 10
    """training iterations: sample a batch of pairs from pi_t, then regress on it"""
    batch_size: int = 16
    """prompts per iteration over all processes (two responses each); paper: 512"""
    num_passes: int = 2
    """K: passes over each iteration's pairs; paper: 4"""
    num_minibatches: int = 2
    """optimizer steps per pass (the pairs are split into this many minibatches)"""
    grad_accum_steps: int = 1
    """micro-batches per minibatch (lowers memory, same result)"""
    lr: float = 1e-5
    """AdamW learning rate; paper: 3e-6"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate schedule after warm-up: linear or cosine decay to 0, or constant"""
    warmup_ratio: float = 0.0
    """fraction of the optimizer steps over which the learning rate warms up linearly from 0"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    eta: float = 1.0
    """eta: the reward scale of the regression target (1/eta weighs the KL to pi_t)"""
    kl_coef: float = 0.05
    """coefficient of the KL-to-reference penalty subtracted from each response's reward"""
    mu: Literal["policy", "reference", "dataset", "best-of-n"] = "policy"
    """where y' comes from: pi_t (default), pi_ref, or the dataset's reference response; best-of-n: y and y' are the
    best and the worst (by KL-regularised reward) of --num-samples responses from pi_t"""
    num_samples: int = 5
    """N, the responses sampled per prompt with --mu best-of-n (at least 2); authors' UltraFeedback runs: 5"""
    temperature: float = 0.7
    """sampling temperature for training (log-probs use the same temperature)"""
    eval_temperature: float = 0.0
    """sampling temperature for evaluation; 0 is greedy"""
    max_new_tokens: int = 16
    """response length; responses are cut after their first EOS; paper (TL;DR): 53"""
    max_prompt_length: int = 512
    """prompts are left-truncated to this many tokens"""
    eos_penalty: float | None = -1.0
    """score given to a response that has no EOS within max_new_tokens (None: no penalty)"""
    micro_batch_size: int = 32
    """sequences per forward pass when computing log-probs without gradient and when evaluating"""
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
    """autocast precision of every model (policy and reference weights stay fp32, the reward model's are loaded in
    it); auto: bfloat16 on GPU, float32 on CPU"""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """also log metrics to tensorboard, wandb or trackio (must be installed), under the run name"""


def check_args(args: Args, world_size: int):
    """Reject bad flag combinations with one clear line, before anything is loaded."""
    common.check_flags(args, world_size, batch_split=("num_minibatches", "grad_accum_steps"),
                       positive=("num_iterations", "num_passes", "num_minibatches", "grad_accum_steps", "temperature",
                                 "eta", "max_new_tokens", "micro_batch_size", "num_eval_prompts", "max_prompt_length"))


def rebel_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_pair: torch.Tensor, logp_pair_old: torch.Tensor,
               reward: torch.Tensor, reward_pair: torch.Tensor, eta: float, keep: torch.Tensor | None = None,
               num_kept: torch.Tensor | None = None) -> torch.Tensor:
    """The REBEL regression (times eta^2), mean over pairs; log-probs are sequence sums:

        ( [ln pi_theta(y) - ln pi_t(y)] - [ln pi_theta(y') - ln pi_t(y')] - eta * [r(y) - r(y')] )^2

    With `keep` (1: kept, 0: dropped): the sum over the kept pairs divided by num_kept (default: their count)."""
    squares = ((logp - logp_old) - (logp_pair - logp_pair_old) - eta * (reward - reward_pair)) ** 2
    keep = torch.ones_like(squares) if keep is None else keep
    return (keep * squares).sum() / (keep.sum() if num_kept is None else num_kept).clamp(min=1)


@torch.no_grad()
def rollout(policy, reference, tokenizer, rows: list[dict], score, args: Args, amp) -> dict:
    """Two responses per prompt (--mu best-of-n: N, sample j of prompt i in row j*b + i), their pi_t and pi_ref
    log-probs, and their KL-regularised rewards; best-of-n then keeps each prompt's best and worst. With one optimizer
    step per batch (`pi_t_in_update`) pi_t's log-probs, the KL and the rewards are left to update().

    Returns tensors with the y half first and the y' half second (2b rows); keep (b rows) is 0 for a dropped pair;
    sample_score is the mean score of every sampled response."""
    device, b, n = next(policy.parameters()).device, len(rows), (args.num_samples if args.mu == "best-of-n" else 2)
    query, query_mask = common.left_pad([r["input_ids"] for r in rows], tokenizer.pad_token_id, device)
    query, query_mask = query.repeat(n, 1), query_mask.repeat(n, 1)
    with amp():
        if args.mu in ("policy", "best-of-n"):
            responses = common.generate(policy, tokenizer, query, query_mask, args.max_new_tokens, args.temperature,
                                        args.generation_batch_size, group=n)  # a prompt's prefill once for its n
        else:
            y = common.generate(policy, tokenizer, query[:b], query_mask[:b], args.max_new_tokens, args.temperature,
                                args.generation_batch_size)
            if args.mu == "reference":
                with common.as_reference(policy, reference) as ref:
                    y_pair = common.generate(ref, tokenizer, query[b:], query_mask[b:], args.max_new_tokens,
                                             args.temperature, args.generation_batch_size)
            else:
                y_pair = common.right_pad([r["reference_ids"] for r in rows], args.max_new_tokens,
                                          tokenizer.pad_token_id, device, tokenizer.eos_token_id)
            responses = torch.cat([y, y_pair])
        mask = common.eos_mask(responses, tokenizer.eos_token_id)
        with common.as_reference(policy, reference) as ref:
            logp_ref = common.logprobs(ref, query, query_mask, responses, mask, args.temperature, args.micro_batch_size,
                                       group=n)  # each prompt through the model once, its KV cache shared by its n
        logp_old = None if pi_t_in_update(args) else common.logprobs(
            policy, query, query_mask, responses, mask, args.temperature, args.micro_batch_size, group=n)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    ended = common.has_eos(responses, mask, tokenizer.eos_token_id)
    scores = score(rows * n, texts)
    if args.eos_penalty is not None:  # a response that never ended gets the fixed penalty instead of its score
        scores = torch.where(ended, scores, args.eos_penalty)
    pairs = dict(query=query, query_mask=query_mask, responses=responses, mask=mask, logp_ref=logp_ref, scores=scores,
                 ended=ended.float())
    if logp_old is not None:  # else update() fills these in from its own forward
        pairs |= pi_t_terms(logp_old, logp_ref, scores, args)
    keep = torch.ones(b, device=device)
    if args.mu == "best-of-n":
        pick, keep = best_and_worst(responses, pairs["rewards"], b)
        pairs = {key: value[pick] for key, value in pairs.items()}
    return pairs | {"keep": keep, "sample_score": scores.mean()}


def pi_t_in_update(args: Args) -> bool:
    """Whether each batch gets exactly one optimizer step (one pass, one minibatch), so the update's forward runs at
    theta = pi_t and its log-probs, detached, are pi_t's: rollout then skips its own pi_t pass (TRL's GRPO does the
    same with one iteration). Not with best-of-n (its pick needs every sample's KL first), nor with LoRA dropout in
    train mode (the update's forward would be noisy where the rollout's is not)."""
    return (args.num_passes == 1 and args.num_minibatches == 1 and args.mu != "best-of-n"
            and not (args.lora_r and args.lora_dropout and args.gradient_checkpointing))


def pi_t_terms(logp_old: torch.Tensor, logp_ref: torch.Tensor, scores: torch.Tensor, args: Args) -> dict:
    """From pi_t's per-token log-probs: their sequence sum, the KL to pi_ref and the KL-regularised reward."""
    kl = (logp_old - logp_ref).sum(1)
    return {"logp_old": logp_old.sum(1), "kl": kl, "rewards": scores - args.kl_coef * kl}


def best_and_worst(responses: torch.Tensor, rewards: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of each prompt's best (argmax reward) then worst (argmin) of its N samples (sample j of prompt i in row
    j*b + i), and keep: 0 where the two are the same tokens (or all N rewards tie: argmax = argmin = sample 0)."""
    prompt, by_prompt = torch.arange(b, device=rewards.device), rewards.view(-1, b)
    best, worst = by_prompt.argmax(0) * b + prompt, by_prompt.argmin(0) * b + prompt
    return torch.cat([best, worst]), (responses[best] != responses[worst]).any(1).float()


def update(policy, optimizer, scheduler, batch: dict, args: Args, amp) -> dict:
    """K passes of the REBEL regression over this rank's pairs, in minibatches of micro-batches.

    Each micro-batch forwards y and y' together (one forward, so DDP sees one backward per forward). The loss is the
    mean over the kept pairs of the minibatch over all ranks (each micro-batch's sum over the ranks' mean count).
    A batch without pi_t's log-probs (`pi_t_in_update`) gets them, its KL and its rewards from the forward at theta =
    pi_t: the loss has the same value and gradient as with a separate pi_t pass."""
    b, device = len(batch["responses"]) // 2, batch["responses"].device
    minibatch, micro = b // args.num_minibatches, b // args.num_minibatches // args.grad_accum_steps
    pi_t_here = "logp_old" not in batch
    if pi_t_here:
        batch |= {key: torch.zeros(2 * b, device=device) for key in ("logp_old", "kl", "rewards")}
    keep = batch.get("keep", torch.ones(b, device=device))
    losses, predicted = [], torch.zeros(b, device=device)
    for _ in range(args.num_passes):
        order = torch.randperm(b, device=device)
        for start in range(0, b, minibatch):
            kept = common.all_reduce(keep[order[start:start + minibatch]].sum(), mean=True)
            for step, micro_start in enumerate(range(start, start + minibatch, micro)):
                i = order[micro_start:micro_start + micro]
                both = torch.cat([i, i + b])  # y rows, then their y' rows
                with common.no_sync_unless(policy, step == args.grad_accum_steps - 1), amp():
                    token_logp = common.logprobs(policy, batch["query"][both], batch["query_mask"][both],
                                                 batch["responses"][both], batch["mask"][both], args.temperature,
                                                 group=2)  # y and y' share their prompt's forward
                    if pi_t_here:  # before the one optimizer step theta is pi_t: its log-probs, detached, are pi_t's
                        terms = pi_t_terms(token_logp.detach(), batch["logp_ref"][both], batch["scores"][both], args)
                        for key, value in terms.items():
                            batch[key][both] = value
                    logp = token_logp.sum(1)
                    logp_ratio = logp - batch["logp_old"][both]
                    loss = rebel_loss(logp[:len(i)], batch["logp_old"][i], logp[len(i):], batch["logp_old"][i + b],
                                      batch["rewards"][i], batch["rewards"][i + b], args.eta, keep[i], kept)
                    loss.backward()
                losses.append(loss.detach())
                predicted[i] = (logp_ratio[:len(i)] - logp_ratio[len(i):]).detach() / args.eta
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    both = torch.stack([predicted, batch["rewards"][:b] - batch["rewards"][b:]])[:, keep.bool()]  # kept pairs
    corr = torch.corrcoef(both)[0, 1].nan_to_num(0.0) if both.shape[1] > 1 else torch.tensor(0.0, device=device)
    return {"loss": torch.stack(losses).sum() / (args.num_passes * args.num_minibatches),
            "reward_diff": both[1].abs().sum() / max(both.shape[1], 1), "regression_corr": corr}


def main(args: Args):
    rank, world_size, device = common.setup(args.seed, args)  # also the run name and the default --output-dir
    check_args(args, world_size)
    dtype, amp = common.precision(args.dtype, device)

    # Data first: a missing column or an empty split stops us before any model is loaded.
    train_rows, eval_rows = common.load_splits(args.dataset, args.train_split, args.eval_split, args.num_eval_prompts,
                                               args.batch_size, "reference" if args.mu == "dataset" else "prompt")
    score = common.make_scorer(args.reward_model, args.reward_fn, device, dtype, args.fsdp)
    tokenizer = common.load_tokenizer(args.model)
    train_rows = common.tokenize_prompts(train_rows, tokenizer, args.max_prompt_length)
    eval_rows = common.tokenize_prompts(eval_rows, tokenizer, args.max_prompt_length)

    # fp32 weights for both, run under the same autocast: at step 0 the reference's log-probs equal the policy's.
    # With LoRA no reference is loaded: pi_ref is the policy with its adapter switched off (common.as_reference).
    policy = common.wrap(common.load_model(args.model, device, lora=args), device, dtype, args.fsdp,
                         args.gradient_checkpointing)
    reference = None if args.lora_r else common.wrap(common.load_model(args.model, device).requires_grad_(False),
                                                     device, dtype, args.fsdp)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    scheduler = common.make_scheduler(optimizer, args.lr_schedule, args.warmup_ratio,
                                      args.num_iterations * args.num_passes * args.num_minibatches)
    start, saved = 0, {}
    if args.resume:  # weights, AdamW state, schedule and random states as the checkpoint left them
        start, saved = common.load_checkpoint(args.output_dir, policy, optimizer, scheduler)
    log = common.make_logger(args.output_dir, args.report_to, vars(args), device, start)

    def eval_metrics():
        with amp():
            return common.score_held_out(policy, tokenizer, eval_rows, score, args.max_new_tokens,
                                         args.eval_temperature, args.micro_batch_size, device)

    before = saved.get("before") or eval_metrics()
    common.print0(f"before training: eval score {before['score']:.3f} (eos fraction {before['eos_fraction']:.2f})")
    batches = common.prompt_batches(train_rows, args.batch_size, args.seed, skip=start)
    for iteration in tqdm(range(start + 1, args.num_iterations + 1), disable=rank != 0, desc=args.exp_name):
        # 1. Sample two (best-of-n: N) responses per prompt; score them; KL-regularise the scores; pick the pairs.
        batch = rollout(policy, reference, tokenizer, next(batches), score, args, amp)
        # 2. Regress the relative log-ratio onto the relative reward (K passes, minibatches).
        stats = update(policy, optimizer, scheduler, batch, args, amp)
        # 3. Log the mean over all processes (score: over every sampled response; the rest: over the pairs).
        metrics = {"score": batch["sample_score"], "kl": batch["kl"].mean(), "eos_fraction": batch["ended"].mean(),
                   "length": batch["mask"].sum(1).float().mean(), "kept_fraction": batch["keep"].mean(), **stats}
        log(metrics | {"lr": scheduler.get_last_lr()[0]}, iteration)
        if args.save_every and iteration % args.save_every == 0:
            common.save_checkpoint(args, iteration, policy, optimizer, scheduler, {"before": before})

    after = eval_metrics()
    common.print0(f"after training:  eval score {after['score']:.3f} (eos fraction {after['eos_fraction']:.2f})")
    log({f"eval_{k}_before": v for k, v in before.items()} | {f"eval_{k}_after": v for k, v in after.items()},
        args.num_iterations)
    common.finish(policy, tokenizer, args, {"before": before, "after": after})


if __name__ == "__main__":
    main(tyro.cli(Args))
