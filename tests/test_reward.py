"""reward.py: the pairwise loss formula, TRL's preference formats, a separable task learned to a stated held-out
accuracy and scored back through common.make_scorer (as the RL scripts load it), normalisation, a missing column."""

import json
import math
import random
import string

import pytest
import torch

import common
import embedded
import reward
from conftest import CPU, read_jsonl, write_jsonl


def test_pairwise_loss_is_the_formula_on_hand_made_numbers():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 1.0, -1.0])
    # -ln sigmoid(d) = ln(1 + e^-d) for d = 1, -1, 0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    assert reward.pairwise_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)


def test_split_preference_reads_every_trl_format():
    user = [{"role": "user", "content": "Q?"}]
    assert common.split_preference({"prompt": "Q?", "chosen": " yes", "rejected": " no"}) == ("Q?", " yes", " no")
    assert common.split_preference({"prompt": user, "chosen": [{"role": "assistant", "content": "yes"}],
                                    "rejected": [{"role": "assistant", "content": "no"}]}) == (user, "yes", "no")
    implicit = {"chosen": user + [{"role": "assistant", "content": "yes"}],
                "rejected": user + [{"role": "assistant", "content": "no"}]}
    assert common.split_preference(implicit) == (user, "yes", "no")
    assert common.split_preference({"chosen": "Q? The cat sat.", "rejected": "Q? The dog ran."}) == \
        ("Q? The", " cat sat.", " dog ran.")


def separable_rows(n: int, seed: int) -> list[dict]:
    """Implicit-prompt conversations: the chosen answer is a random lowercase word, the rejected one a random
    uppercase word (different words every row, so the model has to learn the feature, not the words)."""
    rng = random.Random(seed)

    def word(letters):
        return "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))

    rows = []
    for _ in range(n):
        user = [{"role": "user", "content": f"Name a word like {word(string.ascii_lowercase)}."}]
        rows.append({"chosen": user + [{"role": "assistant", "content": word(string.ascii_lowercase)}],
                     "rejected": user + [{"role": "assistant", "content": word(string.ascii_uppercase)}]})
    return rows


def test_reward_model_learns_a_separable_task_and_loads_as_a_scorer(tiny_gpt2, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", separable_rows(320, seed=0))
    out = tmp_path / "rm"
    # tiny GPT-2 policy (pad id == EOS id) -> one-label reward model
    reward.main(reward.Args(model=tiny_gpt2, dataset=train, num_eval_pairs=32, output_dir=str(out), num_epochs=2.0,
                            batch_size=16, lr=3e-3, normalize=True, num_normalize=64, log_every=10))
    final = read_jsonl(out / "metrics.jsonl")[-1]
    assert final["eval_accuracy_after"] >= 0.95  # stated target on 32 held-out pairs
    assert final["eval_accuracy_after"] > final["eval_accuracy_before"]

    # The RL scripts' loader reads the folder; it ranks fresh held-out pairs the same way.
    score = common.make_scorer(str(out), "unused:fn", CPU, torch.float32)
    fresh = [common.split_preference(r) for r in separable_rows(40, seed=1)]
    tokenizer = common.load_tokenizer(str(out))
    prompts = [p for p, _, _ in fresh]
    texts = [common.render_prompt(p, tokenizer) for p in prompts]
    rows = [{"prompt": p, "prompt_text": t} for p, t in zip(prompts, texts)]
    chosen = score(rows, [c for _, c, _ in fresh])
    rejected = score(rows, [r for _, _, r in fresh])
    assert (chosen > rejected).float().mean().item() >= 0.95

    # --normalize: the training rows' chosen responses score 0 on average through the same loader
    train_pairs = [common.split_preference(r) for r in separable_rows(320, seed=0)[:64]]
    prompts = [p for p, _, _ in train_pairs]
    rows = [{"prompt": p, "prompt_text": common.render_prompt(p, tokenizer)} for p in prompts]
    normalized = score(rows, [c for _, c, _ in train_pairs])
    assert abs(normalized.mean().item()) < 1e-4
    assert json.loads((out / "config.json").read_text())["reward_offset"] != 0.0


def test_missing_rejected_column_is_one_clear_line(tmp_path):
    data = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "Q?", "chosen": "yes"}] * 20)
    with pytest.raises(SystemExit) as error:
        reward.main(reward.Args(model="no/such-model", dataset=data, output_dir=str(tmp_path / "out")))
    message = str(error.value)
    assert message.startswith("error: ") and "'rejected'" in message and "\n" not in message


def test_embedded_preferences_pair_a_right_and_a_wrong_answer():
    data = embedded.arithmetic_preferences()
    assert data["test"]["prompt"] == embedded.arithmetic_dataset()["test"]["prompt"]  # same held-out questions
    for row in data["train"].select(range(200)):
        text = row["prompt"][0]["content"]
        right, wrong = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert embedded.arithmetic_reward([text, text], [right, wrong]) == [1.0, 0.0]
        assert 0 <= int(wrong) and abs(int(wrong) - int(right)) in (1, 2, 10)
    assert embedded.arithmetic_preferences()["train"][:50] == data["train"][:50]  # deterministic
