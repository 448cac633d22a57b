"""Evaluate trained policies against a reference policy: reward, KL, length and a judge's win rate.

For each policy pi (a checkpoint) and the reference pi_ref (the SFT model) on held-out prompts x ~ D, with one
response y ~ pi(.|x) per prompt sampled at temperature T:

    reward    = E[ r(x, y) ]                                   a reward model or a Python function (raw scores)
    kl        = E[ sum_t ln pi(y_t|x, y_<t) - ln pi_ref(y_t|x, y_<t) ]      over the response tokens (EOS included)
    length    = E[ response tokens up to and including the first EOS ]
    win rate  = P( judge prefers y to the dataset's reference response y* )

The KL is the estimate the RL scripts log (log-probs at the sampling temperature, on the policy's own samples), so a
checkpoint's reward and KL here sit on the same axes as training. The judge sees the prompt and the two responses in
a random order (fixed by --seed: position bias cancels out) and answers A or B; an answer naming neither counts as
a tie (half a win). The judge is any chat model through transformers (--judge-model, prompted with --judge-prompt:
by default "dpo", the DPO paper's short TL;DR question; "tldr" and "hh" are the seed's summary and helpfulness
prompts, a one-sentence comparison and then the verdict after "Preferred:" / "More helpful:", which `parse_choice`
reads) or a Python function (--judge-fn module:function, called
with keywords as reward functions are: f(prompts, completions, **dataset_columns) -> answers, completions a list
of [A, B] pairs, each answer a text naming A or B or, as TRL's pairwise judges return, the index 0 or 1). Writes
eval.json (the numbers), samples.jsonl (every response and verdict) and, with several policies and matplotlib
installed, reward_vs_kl.png.

    python evaluate.py --policy runs/sft runs/rebel --reference runs/sft --reward-model runs/reward \
        --judge-model HuggingFaceTB/SmolLM2-135M-Instruct
"""

import functools
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm

import common

SUMMARIES = (
    "Which of the following summaries does a better job of summarizing the most important points in the given "
    "forum post, without including unimportant or irrelevant details? A good summary is both precise and concise."
    "\n\nPost:\n{prompt}\n\nSummary A:\n{a}\n\nSummary B:\n{b}\n\n")
JUDGE_PROMPTS = {
    "dpo": SUMMARIES + 'Which summary is better? Answer with just "A" or "B".',  # answered in a few tokens
    # The seed's two win-rate prompts (the DPO paper's GPT-4 prompts, as the DR-PO paper's Appendix D.3 gives them):
    # a one-sentence comparison, then the verdict on its own line after "Preferred:" / "More helpful:".
    "tldr": (
        SUMMARIES + "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and "
        'why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the '
        'format:\nComparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">'),
    "hh": (
        "For the following query to a chatbot, which response is more helpful?\n\nQuery: {prompt}\n\n"
        "Response A:\n{a}\n\nResponse B:\n{b}\n\n"
        "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. "
        'SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. Your response '
        'should use the format:\nComparison: <one-sentence comparison and explanation>\nMore helpful: <"A" or "B">'),
}
JUDGE_TOKENS = {"tldr": 128, "hh": 128}
"""judge tokens of the named templates that ask for a sentence first (any other template: 8)"""


@dataclass
class Args:
    policy: list[str]
    """one or more policies to evaluate (hub ids or folders), e.g. the SFT model and RL checkpoints"""
    reference: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """pi_ref: the policy the KL is measured against (the SFT model); its tokenizer is used for every policy"""
    reward_model: str | None = None
    """reward model (AutoModelForSequenceClassification, one label; hub id or folder); if unset, --reward-fn"""
    reward_fn: str = "embedded:arithmetic_reward"
    """reward function `module:function` or `file.py:function`, called as TRL does: f(prompts, completions,
    **dataset_columns) -> list of floats"""
    dataset: str = "arithmetic"
    """hub id, local folder or .json/.jsonl/.csv/.parquet file in a TRL format; 'arithmetic' is the embedded task"""
    train_split: str = "train"
    """train split (only used to hold out its last rows when --eval-split is missing)"""
    eval_split: str = "test"
    """split whose prompts (and reference responses, for the win rate) are evaluated"""
    num_prompts: int = 150
    """number of held-out prompts"""
    judge_model: str | None = None
    """chat model (hub id or folder) that judges policy vs. reference response; neither judge: no win rate"""
    judge_fn: str | None = None
    """judge function `module:function` or `file.py:function`, f(prompts, completions, **dataset_columns) ->
    answers; completions are [A, B] pairs, answers texts naming A or B, or indices 0 / 1 as TRL's judges return"""
    judge_prompt: str = "dpo"
    """the judge model's prompt: a name, dpo (the DPO paper's short TL;DR question), tldr or hh (the seed's summary
    and helpfulness prompts: a one-sentence comparison, then "Preferred: A" / "More helpful: B"), or a template
    with the fields {prompt}, {a} and {b}"""
    judge_max_new_tokens: int | None = None
    """tokens the judge model may write (greedy); None: 128 for tldr and hh (room for the sentence), else 8"""
    seed: int = 0
    """seeds the sampling (the same for every policy) and the judge's A/B positions"""
    temperature: float = 0.7
    """sampling temperature; log-probs (and so the KL) use the same temperature, as in training"""
    max_new_tokens: int = 16
    """response length; responses are cut after their first EOS; paper (TL;DR): 53"""
    max_prompt_length: int = 512
    """prompts are left-truncated to this many tokens"""
    micro_batch_size: int = 32
    """sequences per forward pass"""
    generation_backend: Literal["auto", "dynamic", "static"] = "auto"
    """how to sample: "dynamic" is plain `generate`; "static" preallocates the KV cache and, on a GPU, runs a compiled
    decoding step as a CUDA graph (same distribution, faster; compiles once per shape); "auto": static on a GPU,
    dynamic on CPU (where static gains nothing)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """autocast precision (policies and reference keep fp32 weights, as in training, so the same model has KL 0; the
    judge and reward model are loaded in it); auto: bfloat16 on GPU, float32 on CPU"""
    output_dir: str = "runs/evaluate"
    """where eval.json, samples.jsonl and reward_vs_kl.png are written"""


def check_args(args: Args, world_size: int):
    """Reject bad flags with one clear line, before anything is loaded."""
    if world_size > 1:
        common.fail("evaluate.py runs in one process: start it with python, not torchrun")
    if not args.policy:
        common.fail("--policy needs at least one model")
    if args.judge_model is not None and args.judge_fn is not None:
        common.fail("give --judge-model or --judge-fn, not both")
    if args.temperature <= 0:
        common.fail(f"--temperature must be positive (the KL is estimated on samples), got {args.temperature}")
    given = () if args.judge_max_new_tokens is None else ("judge_max_new_tokens",)
    common.check_flags(args, world_size, positive=("num_prompts", "max_new_tokens", "max_prompt_length",
                                                   "micro_batch_size") + given)
    for field in re.findall(r"{(\w*)}", judge_template(args.judge_prompt)):
        if field not in ("prompt", "a", "b"):
            common.fail(f"--judge-prompt: unknown field {{{field}}} (use {{prompt}}, {{a}} and {{b}})")


@torch.no_grad()
def sample(policy, reference, tokenizer, rows, score, args: Args, amp) -> dict:
    """One response per prompt from `policy`; its reward, KL to `reference` (summed over the response) and length."""
    out, device = {"responses": [], "reward": [], "kl": [], "length": [], "ended": []}, reference.device
    for i in range(0, len(rows), args.micro_batch_size):
        batch = rows.select(range(i, min(i + args.micro_batch_size, len(rows)))).to_list()
        query, query_mask = common.left_pad([r["input_ids"] for r in batch], tokenizer.pad_token_id, device)
        with amp():
            responses = common.generate(policy, tokenizer, query, query_mask, args.max_new_tokens, args.temperature)
            mask = common.eos_mask(responses, tokenizer.eos_token_id)
            logp = common.logprobs(policy, query, query_mask, responses, mask, args.temperature)
            logp_ref = common.logprobs(reference, query, query_mask, responses, mask, args.temperature)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        out["responses"] += texts
        out["reward"] += score(batch, texts).tolist()
        out["kl"] += (logp - logp_ref).sum(1).tolist()
        out["length"] += mask.sum(1).tolist()
        out["ended"] += common.has_eos(responses, mask, tokenizer.eos_token_id).tolist()
    return out


def judge_template(judge_prompt: str) -> str:
    """--judge-prompt as a template: a name from JUDGE_PROMPTS, or the flag's text itself."""
    return JUDGE_PROMPTS.get(judge_prompt, judge_prompt)


def judge_tokens(args: Args) -> int:
    """--judge-max-new-tokens, or by default 128 for the named templates that ask for a sentence first, else 8."""
    return args.judge_max_new_tokens or JUDGE_TOKENS.get(args.judge_prompt, 8)


VERDICT = re.compile(r"(?:Preferred|More helpful)\s*:", re.IGNORECASE)


def parse_choice(answer) -> str | None:
    """The judge's verdict (an index 0 or 1 is A or B): the first standalone 'A' or 'B' in the verdict line, None
    (neither: a tie) if there is none. The verdict line is what follows the last "Preferred:" or "More helpful:"
    (or the next non-empty line, if nothing follows it on its own), else the answer's last non-empty line unless
    that is the "Comparison:" line (an answer cut off before its verdict); so a comparison sentence that names both
    A and B above the verdict is not read, and quotes ('"A"') are fine."""
    if isinstance(answer, int):
        return {0: "A", 1: "B"}.get(answer)
    markers = list(VERDICT.finditer(answer))
    lines = (answer[markers[-1].end():] if markers else answer).strip().splitlines()
    verdict = lines[0] if markers and lines else lines[-1] if lines else ""
    if not markers and re.match(r"\s*Comparison\s*:", verdict, re.IGNORECASE):
        verdict = ""
    found = re.search(r"\b([AB])\b", verdict)
    return found.group(1) if found else None


def win_rate(judge, prompts: list[str], responses: list[str], references: list[str], seed: int,
             columns: dict | None = None) -> dict:
    """Fraction of prompts where the judge prefers the policy's response to the reference (a tie counts half).
    Each pair is shown in a random order, drawn from `seed`: the policy is A or B with probability 1/2."""
    rng = random.Random(seed)
    policy_is_a = [rng.random() < 0.5 for _ in responses]
    a = [r if first else ref for r, ref, first in zip(responses, references, policy_is_a)]
    b = [ref if first else r for r, ref, first in zip(responses, references, policy_is_a)]
    answers = list(judge(prompts=prompts, completions=[[x, y] for x, y in zip(a, b)], **(columns or {})))
    if len(answers) != len(prompts):
        common.fail(f"--judge-fn/--judge-model: the judge returned {len(answers)} answers for {len(prompts)} pairs")
    choices = [parse_choice(answer) for answer in answers]
    wins = [0.5 if c is None else float((c == "A") == first) for c, first in zip(choices, policy_is_a)]
    return {"win_rate": sum(wins) / max(len(wins), 1), "ties": choices.count(None), "policy_is_a": policy_is_a,
            "answers": answers, "wins": wins}


def model_judge(name: str, template: str, max_new_tokens: int, micro_batch: int, device, dtype, amp):
    """A chat model as a judge: f(prompts, completions, **columns) -> its greedy answers ([A, B] pairs)."""
    tokenizer = common.load_tokenizer(name)
    model = common.load_model(name, device, dtype).requires_grad_(False)

    def judge(prompts: list[str], completions: list[list[str]], **columns) -> list[str]:
        questions = [template.format(prompt=p, a=a, b=b) for p, (a, b) in zip(prompts, completions)]
        answers = []
        for i in tqdm(range(0, len(questions), micro_batch), desc="judge", leave=False):
            texts = [common.render_prompt([{"role": "user", "content": q}], tokenizer) if tokenizer.chat_template
                     else q for q in questions[i:i + micro_batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
            enc = enc.to(device)
            with amp():
                responses = common.generate(model, tokenizer, enc["input_ids"], enc["attention_mask"],
                                            max_new_tokens, temperature=0)
            answers += tokenizer.batch_decode(responses, skip_special_tokens=True)
        return answers

    return judge


def plain_text(prompt) -> str:
    """A prompt as the judge reads it: the text, a single message's content, or a multi-turn dialogue (HH) as
    'User: ...' and 'Assistant: ...' paragraphs."""
    if isinstance(prompt, str) or len(prompt) == 1:
        return prompt if isinstance(prompt, str) else prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def plot(results: list[dict], path: str) -> bool:
    """Reward vs. KL, one labelled point per policy, as a PNG; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["kl"] for r in results], [r["reward"] for r in results], "o")
    for r in results:
        ax.annotate(os.path.basename(os.path.normpath(r["policy"])), (r["kl"], r["reward"]), fontsize=8)
    ax.set_xlabel("KL to the reference (nats per response)")
    ax.set_ylabel("mean reward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(args: Args):
    _, world_size, device = common.setup(args.seed)
    common.GENERATION_BACKEND = args.generation_backend
    check_args(args, world_size)
    dtype, amp = common.precision(args.dtype, device)
    judging = args.judge_model is not None or args.judge_fn is not None

    # Data first: a missing column or an empty split stops us before any model is loaded.
    _, eval_rows = common.load_splits(args.dataset, args.train_split, args.eval_split, args.num_prompts)
    if len(eval_rows) == 0:
        common.fail(f"--dataset {args.dataset}: no evaluation rows (give --eval-split, or a dataset with more rows)")
    columns = common.column_kwargs(eval_rows.to_list())
    common.check_columns(eval_rows, args.dataset, "reference" if judging else "prompt")
    references = [common.split_prompt(row)[1] for row in eval_rows] if judging else []
    judge = None
    if args.judge_fn is not None:  # errors inside it name the flag
        judge = functools.partial(common.call_user_fn, common.load_reward_fn(args.judge_fn, "--judge-fn"),
                                  f"--judge-fn {args.judge_fn}")
    score = common.make_scorer(args.reward_model, args.reward_fn, device, dtype)
    tokenizer = common.load_tokenizer(args.reference)
    rows = common.tokenize_prompts(eval_rows, tokenizer, args.max_prompt_length)
    prompts = [plain_text(p) for p in rows["prompt"]]
    if args.judge_model is not None:
        judge = model_judge(args.judge_model, judge_template(args.judge_prompt), judge_tokens(args),
                            args.micro_batch_size, device, dtype, amp)
    reference = common.load_model(args.reference, device).requires_grad_(False)  # fp32 under autocast, as training

    results, samples = [], []
    for name in args.policy:
        torch.manual_seed(args.seed)  # every policy samples with the same random stream
        policy = reference if name == args.reference else common.load_model(name, device).requires_grad_(False)
        out = sample(policy, reference, tokenizer, rows, score, args, amp)
        n = len(out["responses"])
        result = {"policy": name, "reward": sum(out["reward"]) / n, "kl": sum(out["kl"]) / n,
                  "length": sum(out["length"]) / n, "eos_fraction": sum(out["ended"]) / n}
        judged = win_rate(judge, prompts, out["responses"], references, args.seed, columns) if judging else None
        if judged is not None:
            result |= {"win_rate": judged["win_rate"], "judge_ties": judged["ties"]}
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()),
              flush=True)
        results.append(result)
        for i in range(n):
            samples.append({"policy": name, "prompt": rows[i]["prompt_text"], "response": out["responses"][i],
                            "reward": out["reward"][i], "kl": out["kl"][i], "length": out["length"][i]} |
                           ({"reference": references[i], "policy_is_a": judged["policy_is_a"][i],
                             "judge_answer": judged["answers"][i], "win": judged["wins"][i]} if judged else {}))
        del policy

    os.makedirs(args.output_dir, exist_ok=True)
    summary = {"reference": args.reference, "dataset": args.dataset, "split": args.eval_split, "num_prompts": len(rows),
               "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
               "reward": args.reward_model or args.reward_fn, "judge": args.judge_model or args.judge_fn,
               "judge_prompt": judge_template(args.judge_prompt) if args.judge_model else None,
               "seed": args.seed, "policies": results}
    with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.output_dir, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    print(f"wrote {args.output_dir}/eval.json and samples.jsonl", flush=True)
    if len(results) > 1:
        if plot(results, os.path.join(args.output_dir, "reward_vs_kl.png")):
            print(f"wrote {args.output_dir}/reward_vs_kl.png", flush=True)
        else:
            print("matplotlib is not installed: no reward_vs_kl.png (pip install matplotlib)", flush=True)
    common.clean_exit()


if __name__ == "__main__":
    main(tyro.cli(Args))
