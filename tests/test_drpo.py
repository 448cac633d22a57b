"""DR-PO (drpo.py): the reset to prefixes of the dataset's response, and learning."""

import torch

import common
import drpo
from conftest import write_jsonl
from ppo_testlib import check_learning_and_bare_evaluation
from ppo_testlib_resets import CHI2_999, check_prefix_is_context_only, chi_square


def test_reset_points_are_uniform():
    torch.manual_seed(0)
    k = common.reset_points(torch.full((70000,), 8))
    assert k.min() == 1 and k.max() == 7
    assert chi_square(torch.bincount(k, minlength=8)[1:].float()) < CHI2_999[6]


def test_dataset_prefixes():
    rows = [{"reference_ids": [9]}, {"reference_ids": [5, 9]}, {"reference_ids": [1, 2, 3, 4, 9]}]  # 9: the EOS
    torch.manual_seed(0)
    draws = [drpo.dataset_prefixes(rows, drpo.Args(reset_prob=1.0)) for _ in range(2000)]
    assert all(d[0] == [] for d in draws)  # len(y*) < 2: no reset
    assert all(d[1] == [5] for d in draws)  # h = 1: the learner writes y*'s last token at least
    assert all(d[2] == [1, 2, 3, 4][:len(d[2])] and 1 <= len(d[2]) <= 4 for d in draws)
    assert chi_square(torch.bincount(torch.tensor([len(d[2]) for d in draws]), minlength=5)[1:].float()) < CHI2_999[3]
    none = [drpo.dataset_prefixes(rows, drpo.Args(reset_prob=0.0)) for _ in range(100)]
    assert all(p == [] for d in none for p in d)
    some = [p for _ in range(2000) for p in drpo.dataset_prefixes(rows, drpo.Args(reset_prob=0.25))[1:]]
    assert abs(sum(p != [] for p in some) / 4000 - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5


def hh_rows() -> list[dict]:
    """Anthropic HH in TRL's conversational format (trl-lib/hh-rlhf-helpful-base): chosen and rejected are whole
    dialogues that differ only in the last assistant turn; the prompt is implicit."""
    rows = []
    for i in range(12):
        turns = [{"role": "user", "content": f"How do I bake bread {i}?"},
                 {"role": "assistant", "content": "Mix flour, water, yeast and salt."},
                 {"role": "user", "content": "How long should it rise?"},
                 {"role": "assistant", "content": "About an hour, until doubled."},
                 {"role": "user", "content": "And then?"}]
        rows.append({"chosen": turns + [{"role": "assistant", "content": f"Bake it at 230 C for {30 + i} min."}],
                     "rejected": turns + [{"role": "assistant", "content": "No idea."}]})
    return rows


def test_multi_turn_hh_rows_give_the_dialogue_as_prompt_and_the_last_answer_as_reference(tiny_tokenizer, tmp_path):
    rows = hh_rows()
    data = write_jsonl(tmp_path / "hh.jsonl", rows)
    train, _ = common.load_splits(data, "train", "test", 2, 4, "reference")  # what drpo.main loads
    encoded = common.tokenize_prompts(train, tiny_tokenizer, 512)
    # the same dialogue with an explicit prompt column gives the same ids
    explicit = write_jsonl(tmp_path / "hh_prompt.jsonl", [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:],
                                                            "rejected": r["rejected"][-1:]} for r in rows])
    encoded_explicit = common.tokenize_prompts(common.load_splits(explicit, "train", "test", 2, 4, "reference")[0],
                                               tiny_tokenizer, 512)
    assert len(encoded) == 11  # the last row held out (a tenth at most)
    for row, source, other in zip(encoded, rows, encoded_explicit):
        history = source["chosen"][:5]  # every turn before the last assistant turn, the last user turn included
        text = tiny_tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
        assert text.count("<|im_start|>assistant") == 3  # two earlier answers and the generation prompt
        assert row["input_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = source["chosen"][-1]["content"]
        assert row["reference_ids"] == tiny_tokenizer(answer, add_special_tokens=False)["input_ids"] + \
            [tiny_tokenizer.eos_token_id]
        assert (other["input_ids"], other["reference_ids"]) == (row["input_ids"], row["reference_ids"])
    # DR-PO's resets are prefixes of that last answer
    torch.manual_seed(0)
    rows_list = [encoded[i] for i in range(4)]
    for prefix, row in zip(drpo.dataset_prefixes(rows_list, drpo.Args(reset_prob=1.0, max_new_tokens=64)),
                           rows_list):
        assert 1 <= len(prefix) < len(row["reference_ids"]) and prefix == row["reference_ids"][:len(prefix)]


def test_dataset_prefix_is_context_only(tiny_llama):
    prefixes = check_prefix_is_context_only(drpo, tiny_llama, reset_prob=1.0)
    import common

    reference = common.load_tokenizer(tiny_llama)("hello world", add_special_tokens=False)["input_ids"]
    assert all(p == reference[:len(p)] and 1 <= len(p) <= len(reference) for p in prefixes)


def test_drpo_learns_and_evaluates_from_bare_prompts(tiny_llama, tmp_path, monkeypatch):
    """8 iterations on the tiny random Llama raise the held-out greedy mean fraction of digits by >= 0.3
    (seed 1 gave 0.11 -> 1.0 when written),
    and evaluation scores the greedy answers from the bare prompts, though every training episode is reset."""
    metrics = check_learning_and_bare_evaluation(drpo, tiny_llama, tmp_path, monkeypatch)
    assert all(m["reset_fraction"] == 1.0 for m in metrics[:-1])


def test_reset_prob_must_be_a_probability():
    import pytest

    with pytest.raises(SystemExit, match="--reset-prob must be in"):
        drpo.check_args(drpo.Args(reset_prob=-0.1), world_size=1)
