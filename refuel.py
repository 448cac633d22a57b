"""REFUEL: REgressing the relative FUturE for muLti-turn RLHF (Gao et al., 2024).

Multi-turn RLHF: the policy (the assistant) talks with a user simulator for up to H_max turns, and a reward judges
the dialogue. An answer at turn h changes every later turn, so REFUEL treats the dialogue so far, up to the user's
turn-h message, as the state s_h, the turn-h answer a as the action, and the reward R of the dialogue that pi_t and
the user continue from there as a's (Monte-Carlo) future return. Text generation has deterministic transitions, so
we can *reset* to s_h and answer it twice. REBEL's regression (see rebel.py) on the two answers a, a' to the same
state then regresses the relative future:

    pi_{t+1} = argmin_theta  E_{s_h, a, a'} ( [ ln pi_theta(a|s_h)/pi_t(a|s_h) - ln pi_theta(a'|s_h)/pi_t(a'|s_h) ]
                                              - eta [ R(s_h, a, ...) - R(s_h, a', ...) ] )^2

and the partition function of the mirror-descent step cancels as in REBEL. Only the turn-h answer's tokens are
regressed (its end-of-turn token included), conditioned on s_h; nothing after turn h is in the input.

Per iteration, for each first user message (a row of --dataset):
  1. draw a horizon H uniformly from {1..H_max} and a turn h uniformly from {1..H};
  2. roll in: pi_t and the user play turns 1..h-1 and the user asks turn h's question: the shared history s_h;
  3. two futures: from s_h, pi_t answers twice (a, a') and each dialogue goes on with the user up to turn H;
  4. score both dialogues (truncated at H): R, R'; a pair with identical answers a = a' carries no signal: dropped;
  5. K passes of the regression over the pairs, in minibatches.
Rolling in once and branching twice is the paper's "roll out tau to H, reset it at turn h, roll out tau'": tau is
the roll-in followed by the first future. Doing it this way plays both futures in one batch.

The user simulator is one interface, `user(conversations) -> next user messages`, with two kinds: an LLM user
(--user-model, any chat model, shown the conversation and asked, as the authors' simulator is, to justify the next
question and then write it after "Question:", which alone is kept) and a rule user
(--user-fn module:function). The embedded default is the arithmetic task continued over turns: the rule user asks
follow-ups that build on the assistant's last answer ("Now add 4 to that."), and the reward is whether the answer at
turn H is right, so an early mistake costs every later turn.

    python refuel.py                                       # embedded multi-turn arithmetic, offline on CPU
    torchrun --nproc_per_node 8 refuel.py --model ... --user-model ... --reward-model ... --dataset ...
"""

import random
import os
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

import common

CONVERSATION = "Below is a conversation between a user and an AI assistant.\n\n{conversation}\n\n"
USER_PROMPTS = {
    # As the authors' simulator does: reason first, then the question after a marker (see `user_message`).
    "refuel": CONVERSATION + (
        "Pretend you are the user in this conversation and decide what the user asks next: a follow-up question "
        "that builds on the conversation and on what the user still wants to know. First write one or two sentences "
        "justifying the question you choose. Then, on a new line, write \"Question:\" followed by the user's next "
        "message exactly as the user would write it."),
    "plain": CONVERSATION + (
        "Pretend you are the user in this conversation. Write the user's next message: a follow-up question that "
        "builds on the conversation. Reply with the message only."),
}
QUESTION = "Question:"
"""the marker after which the LLM user's message starts"""


@dataclass
class Args:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """policy to train (hub id or local folder, a chat model: dialogues go through its chat template)"""
    user_model: str | None = None
    """LLM user: a chat model (hub id or folder) that writes the user's next message; if unset, --user-fn"""
    user_fn: str = "embedded:arithmetic_user"
    """rule user `module:function` or `file.py:function`, f(conversations) -> list of next user messages"""
    user_prompt: str = "refuel"
    """instruction the LLM user reads: a name, refuel (a justification, then the message after "Question:") or plain
    (the message only), or a template in which {conversation} is replaced by the dialogue as a 'User: ...
    Assistant: ...' transcript. The message is what follows the last "Question:" in the LLM user's text (all of it
    if there is none)"""
    user_temperature: float = 0.8
    """sampling temperature of the LLM user (0 is greedy); paper: 0.8"""
    user_max_new_tokens: int = 128
    """length limit of the LLM user's answers (the default prompt has it justify first, then write the question)"""
    user_device: str | None = None
    """device of the LLM user (e.g. cuda:1); default: the policy's device"""
    reward_model: str | None = None
    """reward model over the whole dialogue (one-label AutoModelForSequenceClassification, read through its own chat
    template); if unset, --reward-fn"""
    reward_fn: str = "embedded:arithmetic_chain_reward"
    """reward function `module:function` or `file.py:function`, called as TRL calls one on conversational data:
    f(prompts, completions, **dataset_columns) -> list of floats, prompts = each dialogue up to the user's turn-H
    message, completions = the assistant's turn-H answer as [{"role": "assistant", "content": ...}]"""
    dataset: str = "arithmetic"
    """first user turns: hub id, local folder or .json/.jsonl/.csv/.parquet file with a 'prompt' (or 'messages')
    column; 'arithmetic' is the embedded task"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """split to evaluate on (if missing, the last rows of the train split are held out)"""
    num_eval_prompts: int = 32
    """first user turns whose dialogues are evaluated at every turn before and after training"""
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
    max_turns: int = 5
    """H_max: the longest dialogue, in assistant turns; paper: 5"""
    reset_turn: Literal["uniform", "last"] = "uniform"
    """the reset turn h: uniform over {1..H} (REFUEL), or last (h = H: the two dialogues differ only in their final
    answer, single-turn REBEL on the last turn: the REFUEL paper's baseline)"""
    num_iterations: int = 6
    """training iterations: play pairs of dialogues with pi_t, then regress on them"""
    batch_size: int = 16
    """first user turns (= pairs of dialogues) per iteration over all processes; paper: 128 pairs per step"""
    num_passes: int = 2
    """K: passes over each iteration's pairs"""
    num_minibatches: int = 1
    """optimizer steps per pass (the pairs are split into this many minibatches)"""
    grad_accum_steps: int = 2
    """micro-batches per minibatch (lowers memory, same result)"""
    lr: float = 1e-5
    """AdamW learning rate; paper: 3e-7 (cosine, 10% warm-up)"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate schedule after warm-up: linear or cosine decay to 0, or constant; paper: cosine"""
    warmup_ratio: float = 0.0
    """fraction of the optimizer steps over which the learning rate warms up linearly from 0; paper: 0.1"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    eta: float = 1.0
    """eta: the reward scale of the regression target; paper: 1000 with raw reward-model scores"""
    kl_coef: float = 0.0
    """KL-to-reference penalty on the turn-h answer, subtracted from R; paper: 0 (no reference model is loaded)"""
    temperature: float = 0.8
    """policy sampling temperature for training (log-probs use the same temperature); paper: 0.8"""
    eval_temperature: float = 0.0
    """policy sampling temperature for evaluation; 0 is greedy"""
    max_new_tokens: int = 16
    """length limit of each assistant answer; answers are cut after their first EOS (end-of-turn)"""
    max_prompt_length: int = 1024
    """dialogue histories are left-truncated to this many tokens"""
    eos_penalty: float | None = -1.0
    """score of a dialogue in which an answer from turn h on has no EOS within max_new_tokens (None: no penalty)"""
    micro_batch_size: int = 48
    """sequences per forward pass when generating and computing log-probs without gradient"""
    fsdp: bool = False
    """shard every model over the processes with FSDP2 (for models whose weights, gradients and AdamW state, 16 bytes
    per trained parameter, do not fit one GPU); without it several processes use DDP (a full copy each, faster)"""
    gradient_checkpointing: bool = False
    """recompute each transformer block's activations in the backward pass instead of storing them (less memory,
    about a third more compute in the update; sampling is unaffected)"""
    generation_batch_size: int | None = None
    """sequences per generate call, which bounds the KV cache's memory (None: --micro-batch-size)"""
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
    """autocast precision of every model (the policy's and reference's weights stay fp32; the user's and the reward
    model's are loaded in it); auto: bfloat16 on GPU, float32 on CPU"""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """also log metrics to tensorboard, wandb or trackio (must be installed), under the run name"""


def check_args(args: Args, world_size: int):
    """Reject bad flag combinations with one clear line, before anything is loaded."""
    common.check_flags(args, world_size, batch_split=("num_minibatches", "grad_accum_steps"),
                       positive=("max_turns", "num_iterations", "num_passes", "num_minibatches", "grad_accum_steps",
                                 "max_new_tokens", "user_max_new_tokens", "micro_batch_size", "num_eval_prompts",
                                 "max_prompt_length"))
    if args.temperature <= 0:
        common.fail(f"--temperature must be positive (log-probs divide by it), got {args.temperature}")
    if args.eta <= 0:
        common.fail(f"--eta must be positive, got {args.eta}")
    if "{conversation}" not in USER_PROMPTS.get(args.user_prompt, args.user_prompt):
        common.fail("--user-prompt must contain {conversation}")


# ----------------------------------------------------------------------------------------------------------------
# Dialogues: turns, the user simulator, the reward
# ----------------------------------------------------------------------------------------------------------------
def first_turn(row: dict) -> list[dict]:
    """A dataset row's first user turn as a conversation: its prompt's messages up to the first user message (a
    system message kept), or a plain-string prompt as one user message. Whole dialogues (a 'messages' or 'chosen'
    column) give their opening question."""
    prompt, _ = common.split_prompt(row)
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    first_user = next(i for i, m in enumerate(prompt) if m["role"] == "user")
    return [{"role": m["role"], "content": m["content"]} for m in prompt[:first_user + 1]]


def moves(conversation: list[dict]) -> int:
    """Messages played so far (system messages don't count): turn t's user message is move 2t-1, its answer 2t."""
    return sum(m["role"] != "system" for m in conversation)


def up_to_turn(conversation: list[dict], turn: int) -> list[dict]:
    """The conversation truncated after the assistant's answer at `turn`."""
    cut = [i for i, m in enumerate(conversation) if m["role"] == "assistant"][turn - 1]
    return conversation[:cut + 1]


def transcript(conversation: list[dict]) -> str:
    """The dialogue as plain text, 'User: ...' and 'Assistant: ...' paragraphs."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in conversation if m["role"] != "system")


def turn_query(tokenizer, conversation: list[dict], max_length: int) -> list[int]:
    """Token ids of the conversation with the chat template's generation prompt: what the model answers."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]


@torch.no_grad()
def sample_turns(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 micro_batch: int) -> list[list[int]]:
    """One answer per prompt (token ids, cut after the first EOS, which they keep), in left-padded micro-batches."""
    device = next(model.parameters()).device
    answers = []
    for i in range(0, len(prompts), micro_batch):
        query, query_mask = common.left_pad(prompts[i:i + micro_batch], tokenizer.pad_token_id, device)
        responses = common.generate(model, tokenizer, query, query_mask, max_new_tokens, temperature)
        lengths = common.eos_mask(responses, tokenizer.eos_token_id).sum(1).tolist()
        answers += [row[:n].tolist() for row, n in zip(responses, lengths)]
    return answers


class LLMUser:
    """A chat model playing the user: it reads the dialogue as a transcript inside `prompt` and writes the user's
    next message at its own temperature. Frozen; on `device` (which may be the policy's)."""

    def __init__(self, name: str, device, dtype, prompt: str, temperature: float, max_new_tokens: int,
                 max_length: int, micro_batch: int):
        self.tokenizer = common.load_tokenizer(name)
        self.model = common.load_model(name, torch.device(device), dtype).requires_grad_(False)
        self.prompt, self.temperature, self.max_new_tokens = prompt, temperature, max_new_tokens
        self.max_length, self.micro_batch = max_length, micro_batch

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        asks = [[{"role": "user", "content": self.prompt.format(conversation=transcript(c))}] for c in conversations]
        prompts = [turn_query(self.tokenizer, ask, self.max_length) if self.tokenizer.chat_template else
                   self.tokenizer(ask[0]["content"] + "\n\nUser:")["input_ids"][-self.max_length:] for ask in asks]
        answers = sample_turns(self.model, self.tokenizer, prompts, self.max_new_tokens, self.temperature,
                               self.micro_batch)
        return [user_message(self.tokenizer.decode(a, skip_special_tokens=True)) for a in answers]


def user_message(text: str) -> str:
    """The LLM user's next message in its text: what follows the last "Question:" marker, stripped; the whole text,
    stripped, if it has no marker (a plain prompt, or a user that skipped the justification)."""
    return text[text.rfind(QUESTION) + len(QUESTION):].strip() if QUESTION in text else text.strip()


def make_user(args: Args, device, dtype):
    """The user simulator, user(conversations) -> next user messages: --user-model if given, else --user-fn."""
    if args.user_model is None:
        function = common.load_reward_fn(args.user_fn, "--user-fn")
        return lambda conversations: common.call_user_fn(function, f"--user-fn {args.user_fn}", conversations)
    return LLMUser(args.user_model, args.user_device or device, dtype,
                   USER_PROMPTS.get(args.user_prompt, args.user_prompt), args.user_temperature,
                   args.user_max_new_tokens, args.max_prompt_length, args.micro_batch_size)


def make_scorer(args: Args, device, dtype):
    """score(conversations, rows) -> rewards tensor, `rows` the dataset rows the dialogues started from:
    --reward-model reads each whole dialogue through its own chat template (a plain transcript if it has none) at
    the last token; else --reward-fn f(prompts, completions, **columns) (TRL's convention: see Args.reward_fn)."""
    if args.reward_model is None:
        function = common.load_reward_fn(args.reward_fn)

        def score_fn(conversations, rows):
            values = common.call_user_fn(function, f"--reward-fn {args.reward_fn}",
                                         prompts=[c[:-1] for c in conversations],
                                         completions=[c[-1:] for c in conversations], **common.column_kwargs(rows))
            return common.check_scores(values, len(conversations), f"--reward-fn {args.reward_fn}", device)

        return score_fn
    tokenizer = common.load_tokenizer(args.reward_model)
    tokenizer.padding_side = "right"
    model = common.load_model(args.reward_model, device, dtype, AutoModelForSequenceClassification, num_labels=1)
    model = common.wrap(model.requires_grad_(False), device, dtype, args.fsdp)

    def score_model(conversations, rows):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) if tokenizer.chat_template else transcript(c)
                 for c in conversations]
        return common.check_scores(common.reward_model_scores(model, tokenizer, texts, args.micro_batch_size),
                                   len(texts), f"--reward-model {args.reward_model}")

    return score_model


@torch.no_grad()
def play(policy, tokenizer, user, dialogues: list[list[dict]], stops: list[int], args: Args, temperature: float,
         amp) -> list[list[tuple[list[int], list[int]]]]:
    """Continue each dialogue in place until it has played stops[i] moves (see `moves`). Each round, pi_t answers
    every dialogue waiting on the assistant (one batch), then the user answers every dialogue waiting on the user.
    Returns, per dialogue, its new assistant turns as (query ids, answer ids): exactly what pi_t saw and sampled."""
    played = [[] for _ in dialogues]
    while todo := [i for i, d in enumerate(dialogues) if moves(d) < stops[i]]:
        ask = [i for i in todo if dialogues[i][-1]["role"] == "user"]
        queries = [turn_query(tokenizer, dialogues[i], args.max_prompt_length) for i in ask]
        with amp():
            answers = sample_turns(policy, tokenizer, queries, args.max_new_tokens, temperature,
                                   args.generation_batch_size or args.micro_batch_size)
        for i, query, answer in zip(ask, queries, answers):
            dialogues[i].append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
            played[i].append((query, answer))
        reply = [i for i in todo if moves(dialogues[i]) < stops[i] and dialogues[i][-1]["role"] == "assistant"]
        for i, message in zip(reply, user([dialogues[i] for i in reply]) if reply else []):
            dialogues[i].append({"role": "user", "content": message})
    return played


def turn_tensors(turns: list[tuple[list[int], list[int]]], pad_id: int, width: int, device):
    """(query ids, answer ids) pairs -> left-padded query and mask, right-padded response [B, width] and its mask:
    1 on exactly the answer's tokens (its end-of-turn EOS included), 0 on padding."""
    query, query_mask = common.left_pad([q for q, _ in turns], pad_id, device)
    responses = common.right_pad([a for _, a in turns], width, pad_id, device)
    lengths = torch.tensor([len(a) for _, a in turns], device=device)
    return query, query_mask, responses, (torch.arange(width, device=device)[None] < lengths[:, None]).long()


def draw_turns(n: int, max_turns: int, last: bool = False) -> tuple[list[int], list[int]]:
    """n draws of the horizon H ~ U{1..max_turns} and the reset turn h ~ U{1..H} (last: h = H)."""
    horizons = [random.randint(1, max_turns) for _ in range(n)]
    return horizons, [horizon if last else random.randint(1, horizon) for horizon in horizons]


@torch.no_grad()
def rollout(policy, reference, tokenizer, user, score, rows: list[dict], args: Args, amp) -> dict:
    """Pairs of dialogues that share their history up to the user's turn-h message and differ from turn h's answer
    on; their rewards R, R' (truncated at H), and pi_t's log-probs of the two turn-h answers.

    Tensors have the a half first and the a' half second (2b rows); `dialogues` are the 2b conversations."""
    b, device = len(rows), common.unwrap(policy).device
    horizons, resets = draw_turns(b, args.max_turns, args.reset_turn == "last")
    # Roll in: turns 1..h-1 and the user's turn-h question, the shared history s_h (the reset state).
    histories = [first_turn(row) for row in rows]
    with common.gathered(policy):  # under FSDP2: whole on every rank, as ranks play different numbers of rounds
        play(policy, tokenizer, user, histories, [2 * h - 1 for h in resets], args, args.temperature, amp)
        # Two futures from s_h, both played to turn H in one batch: turn h's answers a (rows :b) and a' (rows b:).
        dialogues = [list(history) for history in histories + histories]
        played = play(policy, tokenizer, user, dialogues, [2 * horizon for horizon in horizons] * 2, args,
                      args.temperature, amp)
    scores = score(dialogues, rows * 2)
    ended = torch.tensor([all(a[-1:] == [tokenizer.eos_token_id] for _, a in turns) for turns in played],
                         device=device)  # every answer of the future (turns h..H) ended within --max-new-tokens
    if args.eos_penalty is not None:
        scores = torch.where(ended, scores, args.eos_penalty)
    # The regression's inputs: query = s_h with the generation prompt, response = the turn-h answer (EOS included).
    answers = [turns[0][1] for turns in played]
    query, query_mask, responses, mask = turn_tensors([turns[0] for turns in played], tokenizer.pad_token_id,
                                                      args.max_new_tokens, device)
    with amp():
        logp_old = common.logprobs(policy, query, query_mask, responses, mask, args.temperature,
                                   args.micro_batch_size, group=2).sum(1)  # s_h through the model once for a, a'
        kl = torch.zeros_like(logp_old)
        if args.kl_coef:
            with common.as_reference(policy, reference) as ref:
                kl = logp_old - common.logprobs(ref, query, query_mask, responses, mask, args.temperature,
                                                args.micro_batch_size, group=2).sum(1)
    keep = torch.tensor([a != a_pair for a, a_pair in zip(answers[:b], answers[b:])], device=device).float()
    return dict(query=query, query_mask=query_mask, responses=responses, mask=mask, logp_old=logp_old,
                scores=scores, kl=kl, rewards=scores - args.kl_coef * kl, keep=keep, ended=ended.float(),
                dialogues=dialogues, horizons=horizons, resets=resets)


def refuel_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_pair: torch.Tensor, logp_pair_old: torch.Tensor,
                reward: torch.Tensor, reward_pair: torch.Tensor, eta: float, keep: torch.Tensor,
                num_kept: torch.Tensor | None = None) -> torch.Tensor:
    """REBEL's regression on the turn-h answers a, a' (times eta^2), summed over the kept pairs (keep = 1) and
    divided by num_kept, the kept pairs of the whole minibatch (default: these pairs' own count, the mean):

        ( [ln pi_theta(a|s_h) - ln pi_t(a|s_h)] - [ln pi_theta(a'|s_h) - ln pi_t(a'|s_h)] - eta * [R - R'] )^2

    Dropped pairs (identical answers, whose residual is a constant) count zero, which keeps DDP ranks in step."""
    residual = (logp - logp_old) - (logp_pair - logp_pair_old) - eta * (reward - reward_pair)
    num_kept = keep.sum() if num_kept is None else num_kept
    return (keep * residual ** 2).sum() / num_kept.clamp(min=1)


def update(policy, optimizer, scheduler, batch: dict, args: Args, amp) -> dict:
    """K passes of the REFUEL regression over this rank's pairs, in minibatches of micro-batches.

    Each micro-batch forwards a and a' together (one forward, so DDP sees one backward per forward). The loss is the
    mean over the kept pairs of the whole minibatch over all ranks: each micro-batch's sum divided by that global
    count (times the number of ranks, which DDP's gradient average divides out), so a micro-batch with few kept pairs
    weighs no more than its pairs."""
    b = len(batch["rewards"]) // 2
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    minibatch, micro = b // args.num_minibatches, b // args.num_minibatches // args.grad_accum_steps
    device = batch["rewards"].device
    losses, predicted = [], torch.zeros(b, device=device)
    for _ in range(args.num_passes):
        order = torch.randperm(b, device=device)
        for start in range(0, b, minibatch):
            kept = common.all_reduce(batch["keep"][order[start:start + minibatch]].sum()) / world
            for step, micro_start in enumerate(range(start, start + minibatch, micro)):
                i = order[micro_start:micro_start + micro]
                both = torch.cat([i, i + b])  # a rows, then their a' rows
                with common.no_sync_unless(policy, step == args.grad_accum_steps - 1), amp():
                    logp = common.logprobs(policy, batch["query"][both], batch["query_mask"][both],
                                           batch["responses"][both], batch["mask"][both], args.temperature,
                                           group=2).sum(1)  # a and a' share s_h's forward
                    logp_ratio = logp - batch["logp_old"][both]
                    loss = refuel_loss(logp[:len(i)], batch["logp_old"][i], logp[len(i):], batch["logp_old"][i + b],
                                       batch["rewards"][i], batch["rewards"][i + b], args.eta, batch["keep"][i], kept)
                    loss.backward()
                losses.append(loss.detach())
                predicted[i] = (logp_ratio[:len(i)] - logp_ratio[len(i):]).detach() / args.eta
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    target, keep = batch["rewards"][:b] - batch["rewards"][b:], batch["keep"].bool()
    corr = torch.corrcoef(torch.stack([predicted[keep], target[keep]]))[0, 1] if keep.sum() > 1 else torch.tensor(0.)
    return {"loss": torch.stack(losses).sum() / (args.num_passes * args.num_minibatches),
            "reward_diff": target[keep].abs().sum() / keep.sum().clamp(min=1), "regression_corr": corr.nan_to_num(0.0),
            "signal_fraction": (target[keep] != 0).sum() / keep.sum().clamp(min=1)}  # kept pairs whose R != R'


@torch.no_grad()
def evaluate_turns(policy, tokenizer, user, score, rows: list[dict], args: Args, amp) -> list[float]:
    """Mean reward at each turn 1..max_turns of dialogues played to max_turns from the evaluation rows' first turns,
    over all ranks (policy at --eval-temperature; for the embedded task, the accuracy at each turn)."""
    dialogues = [first_turn(row) for row in rows]
    with common.gathered(policy):  # under FSDP2: whole on every rank, as ranks play different numbers of rounds
        play(policy, tokenizer, user, dialogues, [2 * args.max_turns] * len(dialogues), args, args.eval_temperature,
             amp)
    totals = torch.stack([score([up_to_turn(d, t) for d in dialogues], rows).sum()
                          for t in range(1, args.max_turns + 1)]
                         + [torch.tensor(float(len(dialogues)), device=common.unwrap(policy).device)])
    totals = common.all_reduce(totals)  # sums over ranks, then the ratio: the global mean
    return (totals[:-1] / totals[-1].clamp(min=1)).tolist()


def main(args: Args):
    rank, world_size, device = common.setup(args.seed, args)  # also the run name and the default --output-dir
    check_args(args, world_size)
    dtype, amp = common.precision(args.dtype, device)

    # Data first: a missing column or an empty split stops us before any model is loaded.
    train_rows, eval_rows = common.load_splits(args.dataset, args.train_split, args.eval_split, args.num_eval_prompts,
                                               args.batch_size)
    eval_rows = common.shard(eval_rows).to_list()
    user, score = make_user(args, device, dtype), make_scorer(args, device, dtype)
    tokenizer = common.load_tokenizer(args.model)
    if tokenizer.chat_template is None:
        common.fail(f"--model {args.model}: the tokenizer has no chat template (dialogues need one)")

    # fp32 weights for both, run under the same autocast: at step 0 the reference's log-probs equal the policy's
    # With LoRA no reference is loaded: pi_ref is the policy with its adapter switched off (common.as_reference).
    policy = common.wrap(common.load_model(args.model, device, lora=args), device, dtype, args.fsdp,
                         args.gradient_checkpointing)
    reference = None
    if args.kl_coef and not args.lora_r:
        reference = common.wrap(common.load_model(args.model, device).requires_grad_(False), device, dtype, args.fsdp)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    scheduler = common.make_scheduler(optimizer, args.lr_schedule, args.warmup_ratio,
                                      args.num_iterations * args.num_passes * args.num_minibatches)
    start, saved = 0, {}
    if args.resume:  # weights, AdamW state, schedule and random states as the checkpoint left them
        start, saved = common.load_checkpoint(args.output_dir, policy, optimizer, scheduler)
    log = common.make_logger(args.output_dir, args.report_to, vars(args), device, start)

    before = saved.get("before") or evaluate_turns(policy, tokenizer, user, score, eval_rows, args, amp)
    common.print0("before training, eval reward per turn: " + " ".join(f"{v:.3f}" for v in before))
    batches = common.prompt_batches(train_rows, args.batch_size, args.seed, skip=start)
    for iteration in tqdm(range(start + 1, args.num_iterations + 1), disable=rank != 0, desc=args.exp_name):
        # 1. Roll in to turn h, branch two futures to turn H with pi_t and the user, score both.
        batch = rollout(policy, reference, tokenizer, user, score, next(batches), args, amp)
        # 2. Regress the relative log-ratio of the turn-h answers onto the relative future reward.
        stats = update(policy, optimizer, scheduler, batch, args, amp)
        # 3. Log the mean over all processes.
        metrics = {"score": batch["scores"].mean(), "kl": batch["kl"].mean(), "kept_fraction": batch["keep"].mean(),
                   "ended_fraction": batch["ended"].mean(),
                   "horizon": torch.tensor(batch["horizons"], dtype=torch.float).mean(),
                   "reset_turn": torch.tensor(batch["resets"], dtype=torch.float).mean(),
                   "turn_h_length": batch["mask"].sum(1).float().mean(), **stats}
        log(metrics | {"lr": scheduler.get_last_lr()[0]}, iteration)
        if args.save_every and iteration % args.save_every == 0:
            common.save_checkpoint(args, iteration, policy, optimizer, scheduler, {"before": before})

    after = evaluate_turns(policy, tokenizer, user, score, eval_rows, args, amp)
    common.print0("eval reward per turn (accuracy for the embedded task)\nturn  before  after")
    for turn, (old, new) in enumerate(zip(before, after), 1):
        common.print0(f"{turn:>4}  {old:6.3f}  {new:6.3f}")
    log({f"eval_turn{t}_before": v for t, v in enumerate(before, 1)}
        | {f"eval_turn{t}_after": v for t, v in enumerate(after, 1)}, args.num_iterations)
    common.finish(policy, tokenizer, args, {"before": before, "after": after})


if __name__ == "__main__":
    main(tyro.cli(Args))
