"""ppo.py's pieces against hand-computed numbers: GAE, masked whitening, the clipped losses, the per-token rewards.

Every expected number below is worked out by hand in the comment next to it."""

import math

import pytest
import torch

import ppo
from conftest import CPU


def test_gae_matches_hand_computed_example():
    # Row 0: three response tokens. Row 1: two tokens, then padding whose (garbage) rewards and values must be ignored.
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma 1, lambda 0.5. Row 0: delta_2 = 2 + 0 - 1.5 = 0.5, A_2 = 0.5; delta_1 = 0 + 1.5 - 1 = 0.5,
    # A_1 = 0.5 + 0.5 * 0.5 = 0.75; delta_0 = 1 + 1 - 0.5 = 1.5, A_0 = 1.5 + 0.5 * 0.75 = 1.875.
    # Row 1: A_2 = 0 (padding); delta_1 = 3 + 0 - 2 = 1, A_1 = 1; delta_0 = 0 + 2 - 1 = 1, A_0 = 1 + 0.5 * 1 = 1.5.
    expected = torch.tensor([[1.875, 0.75, 0.5], [1.5, 1.0, 0.0]])
    torch.testing.assert_close(ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5), expected)
    # gamma 0.5, lambda 1 is the discounted return minus V: A_0 = 1 + 0.25 * 2 - 0.5 = 1, A_1 = 0.5 * 2 - 1 = 0,
    # A_2 = 2 - 1.5 = 0.5.
    torch.testing.assert_close(ppo.gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0),
                               torch.tensor([[1.0, 0.0, 0.5]]))


def test_whitening_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 1000.0], [3.0, -500.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    kept = torch.tensor([1.0, 2.0, 3.0, 7.0])  # mean 3.25, unbiased variance 7.5833
    whitened = ppo.masked_whiten(x, mask)
    expected = (kept - 3.25) / math.sqrt(((kept - 3.25) ** 2).sum().item() / 3)
    torch.testing.assert_close(whitened[mask.bool()], expected)
    assert whitened[~mask.bool()].abs().max() == 0
    scaled = ppo.masked_whiten(x, mask, shift_mean=False)  # scale only: the mean stays 3.25
    torch.testing.assert_close(scaled[mask.bool()], expected + 3.25)


def test_clipped_policy_loss_matches_formula():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    loss, clipped = ppo.policy_loss(ratio.log(), torch.zeros(5), advantages, eps=0.2)
    # max(-A rho, -A clip(rho, 0.8, 1.2)): max(-1.5, -1.2) = -1.2 (clipped); max(1.5, 1.2) = 1.5;
    # max(-0.5, -0.8) = -0.5; max(0.5, 0.8) = 0.8 (clipped); rho inside the range: -2.2.
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.2]))
    assert clipped.tolist() == [True, False, False, True, False]


def test_clipped_value_loss_matches_formula():
    values, old, returns = torch.tensor([1.0, 1.0, 0.6]), torch.tensor([0.5, 0.5, 0.5]), torch.tensor([2.0, 0.0, 3.0])
    loss, clipped = ppo.value_loss(values, old, returns, eps=0.2)
    # V clipped to old +- 0.2 = 0.7: 0.5 max((1 - 2)^2, (0.7 - 2)^2) = 0.845 (clipped); 0.5 max(1, 0.49) = 0.5;
    # 0.6 is inside [0.3, 0.7]: 0.5 * 2.4^2 = 2.88.
    torch.testing.assert_close(loss, torch.tensor([0.845, 0.5, 2.88]))
    assert clipped.tolist() == [True, False, False]


def test_token_rewards_put_kl_on_every_token_and_the_score_on_the_last():
    args = ppo.Args(kl_coef=0.1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # row 0 ends at index 2 (its EOS), row 1 has no EOS
    batch = dict(mask=mask, logp_old=torch.tensor([[-1.0, -2.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]),
                 logp_ref=torch.tensor([[-2.0, -2.0, -3.0, 0.0], [-1.0, -1.0, -1.0, -2.0]]),
                 values=torch.zeros(2, 4), scores=torch.tensor([5.0, -1.0]))
    out = ppo.advantages_and_returns(batch, args)
    # -0.1 * (logp_old - logp_ref) per token, plus the score at the last response token
    expected = torch.tensor([[-0.1, 0.0, -0.2 + 5.0, 0.0], [0.0, 0.0, 0.0, -0.1 - 1.0]])
    torch.testing.assert_close(out["rewards"], expected)
    assert out["advantages"][0, 3] == 0 and out["returns"][0, 3] == 0
    assert abs(ppo.masked_mean(out["advantages"], mask.float()).item()) < 1e-6  # whitened over the 7 tokens


@pytest.mark.parametrize("bad", [dict(batch_size=6, num_minibatches=4), dict(lam=1.5), dict(temperature=0.0),
                                 dict(num_ppo_epochs=0)])
def test_check_args_rejects_bad_flags(bad):
    with pytest.raises(SystemExit, match="^error: "):
        ppo.check_args(ppo.Args(**bad), world_size=1)


def test_ppo_learns_and_evaluates_from_bare_prompts(tiny_llama, tmp_path, monkeypatch):
    """10 iterations on the tiny random Llama raise the held-out greedy mean fraction of digits by >= 0.3 (seeds 1, 2
    and 3 each gave 0.11 -> 1.0; sampled score, mean of the first and last 3 iterations, 0.13 -> 0.43 at seed 1)."""
    from ppo_testlib import check_learning_and_bare_evaluation

    check_learning_and_bare_evaluation(ppo, tiny_llama, tmp_path, monkeypatch)


def test_rollout_starts_every_episode_at_the_bare_prompt(tiny_llama):
    """The query is exactly the left-padded prompt ids (no prefix), the responses are pi_t's samples from it, and the
    scorer reads the responses alone."""
    from datasets import Dataset

    import common

    tokenizer = common.load_tokenizer(tiny_llama)
    args = ppo.Args(model=tiny_llama, max_new_tokens=6, micro_batch_size=2, temperature=0.7)
    policy, reference = common.load_model(tiny_llama, CPU), common.load_model(tiny_llama, CPU)
    with torch.no_grad():  # sharpen pi_t (= pi_ref): its samples then depend on the context they were drawn from
        policy.lm_head.weight.mul_(20.0)
        reference.lm_head.weight.mul_(20.0)
    model = ppo.PolicyAndValue(policy, ppo.load_value_model(args, CPU))
    data = Dataset.from_list([{"prompt": p, "completion": " hello"} for p in ["Hi", "Say 12345:", "What?"]])
    rows = list(common.tokenize_prompts(data, tokenizer, 64))
    seen = []

    def score(*given):  # either scorer convention: the completions come last
        seen.append(list(given[-1]))
        return torch.zeros(len(given[-1]))

    torch.manual_seed(0)
    batch = ppo.rollout(model, reference, tokenizer, rows, score, args, common.precision("float32", CPU)[1])
    query, query_mask = common.left_pad([r["input_ids"] for r in rows], tokenizer.pad_token_id)
    assert query_mask[0, 0] == 0  # the prompts differ in length, so left padding is exercised
    assert torch.equal(batch["query"], query) and torch.equal(batch["query_mask"], query_mask)
    torch.manual_seed(0)
    assert torch.equal(batch["responses"], common.generate(model.policy, tokenizer, query, query_mask, 6, 0.7))
    assert seen == [tokenizer.batch_decode(batch["responses"], skip_special_tokens=True)]
    # pi_t == pi_ref at the start: the policy's per-token log-probs (through PolicyAndValue, in micro-batches of 2)
    # equal the reference's
    torch.testing.assert_close(batch["logp_old"], batch["logp_ref"], atol=1e-5, rtol=0)
