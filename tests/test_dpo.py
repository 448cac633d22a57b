"""dpo.py: the loss formula, sequences identical to the RL scripts', log 2 at the first step, a separable task
learned to a stated held-out accuracy, a missing column."""

import math
import random
import string

import pytest
import torch
from datasets import Dataset

import common
import dpo
from conftest import read_jsonl, write_jsonl


def test_dpo_loss_is_the_formula_on_hand_made_numbers():
    logp_w, logp_l = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_w, ref_l = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.5
    # pair 1: (-3 + 3.5) - (-4 + 3) = 1.5; pair 2: (-5 + 4) - (-2 + 3) = -2
    expected = (math.log(1 + math.exp(-beta * 1.5)) + math.log(1 + math.exp(beta * 2))) / 2
    assert dpo.dpo_loss(logp_w, logp_l, ref_w, ref_l, beta).item() == pytest.approx(expected, abs=1e-6)


def test_pairs_are_tokenized_as_the_rl_scripts_see_them(tiny_tokenizer):
    for row in ({"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5"},
                {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
                 "chosen": [{"role": "assistant", "content": "4"}],
                 "rejected": [{"role": "assistant", "content": "5"}]}):
        pair = dpo.tokenize_pairs(Dataset.from_list([row]), tiny_tokenizer, 512, 64)[0]
        as_prompt = common.tokenize_prompts(Dataset.from_list([row]), tiny_tokenizer, 512)[0]
        assert pair["input_ids"] == as_prompt["input_ids"]
        assert pair["chosen_ids"] == as_prompt["reference_ids"]  # content + EOS, as a sampled response is cut
        swapped = {**row, "chosen": row["rejected"]}
        assert pair["rejected_ids"] == common.tokenize_prompts(Dataset.from_list([swapped]), tiny_tokenizer,
                                                               512)[0]["reference_ids"]


def separable_rows(n: int, seed: int) -> list[dict]:
    """Plain-text prompt/chosen/rejected: a lowercase word is preferred to an uppercase one."""
    rng = random.Random(seed)

    def word(letters):
        return "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))

    return [{"prompt": f"Word like {word(string.ascii_lowercase)}:", "chosen": " " + word(string.ascii_lowercase),
             "rejected": " " + word(string.ascii_uppercase)} for _ in range(n)]


def test_dpo_learns_a_separable_task(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_rows(288, seed=0))
    out = tmp_path / "dpo"
    dpo.main(dpo.Args(model=tiny_llama, dataset=data, num_eval_pairs=32, output_dir=str(out), num_epochs=2.0,
                      batch_size=16, lr=3e-3, beta=0.5, reward_fn=None, log_every=1))
    metrics = read_jsonl(out / "metrics.jsonl")
    # at the first step the policy is the reference: every margin is 0 and the loss is exactly ln 2
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    final = metrics[-1]
    assert final["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-5)
    assert final["eval_accuracy_after"] >= 0.9  # stated target on 32 held-out pairs
    assert final["eval_loss_after"] < 0.5
    assert final["eval_margin_after"] > 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_missing_chosen_column_is_one_clear_line(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q?", "completion": "A."}] * 20)
    with pytest.raises(SystemExit) as error:
        dpo.main(dpo.Args(model="no/such-model", dataset=data, reward_fn=None, output_dir=str(tmp_path / "out")))
    message = str(error.value)
    assert message.startswith("error: ") and "'chosen'" in message and "\n" not in message
