"""DR-PO (drpo.py): the reset to prefixes of the dataset's response, and learning."""

import torch

import common
import drpo
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
