"""PPO++ (ppo_plus.py): the reset to roll-ins of pi_ref, and learning.

When pi_ref ends inside its roll-in: the roll-in length k is uniform over {1, ..., L - 1}, L the guide's length up to
and including its first EOS, so the roll-in stops before the guide's EOS and never contains it; a guide that ends
at once (L = 1) gives no reset (the episode starts at the bare prompt)."""

import torch

import common
import ppo_plus
from conftest import CPU
from ppo_testlib import check_learning_and_bare_evaluation
from ppo_testlib_resets import CHI2_999, check_prefix_is_context_only, chi_square


def test_reset_points_are_uniform():
    torch.manual_seed(0)
    k = common.reset_points(torch.full((70000,), 8))  # k in {1..7}
    assert k.min() == 1 and k.max() == 7
    assert chi_square(torch.bincount(k, minlength=8)[1:].float()) < CHI2_999[6]
    assert common.reset_points(torch.tensor([0, 1])).tolist() == [0, 0]  # L < 2: no reset


class ScriptedGuide(torch.nn.Module):
    """A fixed pi_ref for the test: its `generate` answers the query whose last token is keys[i] with script[i]."""

    def __init__(self, keys: list[int], script: torch.Tensor):
        super().__init__()
        self.keys, self.script = keys, script
        self.generation_config = None  # common.generate swaps a model's own generation config out and back

    def generate(self, input_ids, attention_mask, generation_config, logits_processor, synced_gpus):
        return torch.cat([input_ids, self.script[[self.keys.index(q) for q in input_ids[:, -1].tolist()]]], 1)


def test_rollin_stops_before_the_guides_eos(tiny_llama):
    tokenizer = common.load_tokenizer(tiny_llama)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    a, b, c = (tokenizer.convert_tokens_to_ids(t) for t in "abc")
    script = torch.tensor([[eos, a, a, a, a, a],   # ends at once: L = 1, no reset
                           [a, b, eos, pad, pad, pad],  # L = 3: k in {1, 2}, the EOS is never in the roll-in
                           [a, b, c, a, b, c],     # no EOS: L = 6, k in {1..5}
                           [c, eos, pad, pad, pad, pad]])  # L = 2: k = 1
    keys = tokenizer.convert_tokens_to_ids(list("0123"))
    rows = [{"input_ids": [a, b, key]} for key in keys]
    args = ppo_plus.Args(max_new_tokens=6, beta=0.0)
    torch.manual_seed(0)
    guide = ScriptedGuide(keys, script)
    draws = [ppo_plus.rollin(guide, tokenizer, rows, args, CPU) for _ in range(1500)]
    assert all(d[0] == [] for d in draws)
    assert all(d[3] == [c] for d in draws)
    assert all(eos not in p for d in draws for p in d)
    assert all(d[1] in ([a], [a, b]) for d in draws)
    ones = sum(d[1] == [a] for d in draws)
    assert abs(ones - 750) < 4 * 19.4  # binomial(1500, 1/2): 4 standard deviations
    assert all(d[2] == script[2, :len(d[2])].tolist() for d in draws)
    assert chi_square(torch.bincount(torch.tensor([len(d[2]) for d in draws]), minlength=6)[1:].float()) < CHI2_999[4]

    # beta: the probability of starting at the bare prompt (rows 1-3 would otherwise always be reset)
    args = ppo_plus.Args(max_new_tokens=6, beta=0.3)
    draws = [ppo_plus.rollin(guide, tokenizer, rows, args, CPU) for _ in range(1500)]
    bare = sum(p == [] for d in draws for p in d[1:])
    assert abs(bare / 4500 - 0.3) < 4 * (0.3 * 0.7 / 4500) ** 0.5


def test_rollin_prefix_is_context_only(tiny_llama):
    prefixes = check_prefix_is_context_only(ppo_plus, tiny_llama, beta=0.0)
    assert all(1 <= len(p) <= 5 for p in prefixes)  # the random tiny guide has no EOS within 6 tokens: L = 6


def test_ppo_plus_learns_and_evaluates_from_bare_prompts(tiny_llama, tmp_path, monkeypatch):
    """8 iterations on the tiny random Llama raise the held-out greedy mean fraction of digits by >= 0.3
    (seed 1 gave 0.11 -> 0.64 when written),
    and evaluation scores the greedy answers from the bare prompts."""
    metrics = check_learning_and_bare_evaluation(ppo_plus, tiny_llama, tmp_path, monkeypatch)
    reset = sum(m["reset_fraction"] for m in metrics[:-1]) / (len(metrics) - 1)
    assert 0.6 < reset < 0.95  # beta = 0.2: about 80% of episodes start from a roll-in


def test_beta_must_be_a_probability():
    import pytest

    with pytest.raises(SystemExit, match="--beta must be in"):
        ppo_plus.check_args(ppo_plus.Args(beta=1.5), world_size=1)
