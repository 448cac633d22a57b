"""Checks shared by test_ppo_plus.py and test_drpo.py: the reset prefix is context only."""

import torch
from datasets import Dataset

import common
from conftest import CPU


def chi_square(counts: torch.Tensor) -> float:
    """Pearson's chi-square statistic of counts against the uniform distribution over their bins."""
    expected = counts.sum() / len(counts)
    return (((counts - expected) ** 2) / expected).sum().item()


# 99.9% quantiles of the chi-square distribution by degrees of freedom: a fair sampler fails 1 time in 1000
CHI2_999 = {1: 10.83, 3: 16.27, 4: 18.47, 6: 22.46}


def tiny_rows(tokenizer, completion: str = "hello world") -> list[dict]:
    data = Dataset.from_list([{"prompt": f"Say {i}:", "completion": completion} for i in range(4)])
    return [dict(r) for r in common.tokenize_prompts(data, tokenizer, 512)]


def check_prefix_is_context_only(module, model_dir: str, **reset_flags) -> list[list[int]]:
    """Roll out with every episode reset; check that
    - the learner's query is exactly prompt + prefix (left-padded); prefix + response fit in max_new_tokens (the
      authors' budget: a reset episode is never longer than a bare one); the log-probs, values, rewards and
      advantages cover response tokens only (zero after the EOS);
    - the score read prefix + response;
    - in the update, the gradient reaching the final hidden states (the input of the LM head and of the value head)
      is exactly zero at every position before the last context token, i.e. no loss, KL or advantage term reads a
      prompt or prefix position, and nonzero where the first learner token is predicted.
    Returns each row's prefix."""
    torch.manual_seed(0)
    args = module.Args(model=model_dir, batch_size=4, num_minibatches=1, num_ppo_epochs=1, max_new_tokens=6,
                       eos_penalty=None, lr=1e-3, **reset_flags)
    tokenizer = common.load_tokenizer(model_dir)
    rows = tiny_rows(tokenizer)
    policy = common.load_model(model_dir, CPU)
    value = module.load_value_model(args, CPU)
    torch.nn.init.normal_(value.score.weight, std=0.5)  # a nonzero value head, so value gradients reach the backbone
    model = module.PolicyAndValue(policy, value)
    reference = common.load_model(model_dir, CPU).requires_grad_(False)
    scored = []

    def score(rows, responses):
        scored.extend(responses)
        return torch.tensor([r.count("a") / max(len(r), 1) + 1.0 for r in responses])

    amp = common.precision("float32", CPU)[1]
    batch = module.rollout(model, reference, tokenizer, rows, score, args, amp)
    batch |= module.advantages_and_returns(batch, args)
    b, width = len(rows), args.max_new_tokens
    for key in ("responses", "mask", "logp_old", "logp_ref", "values", "rewards", "advantages", "returns"):
        assert batch[key].shape == (b, width), key
        assert (batch[key][batch["mask"] == 0] == 0).all() or key == "responses", key
    prefixes = []
    for i, row in enumerate(rows):
        query = batch["query"][i][batch["query_mask"][i].bool()].tolist()
        assert query[:len(row["input_ids"])] == row["input_ids"]
        prefix = query[len(row["input_ids"]):]
        assert len(prefix) == batch["prefix_length"][i] > 0  # every episode was reset
        assert tokenizer.eos_token_id not in prefix
        # The authors' budget: prefix + response <= max_new_tokens, so no reset episode is longer than a bare one.
        n = batch["mask"][i].sum().item()
        assert len(prefix) + n <= width and (batch["mask"][i, width - len(prefix):] == 0).all()
        expected = tokenizer.decode(prefix + batch["responses"][i, :n].tolist(), skip_special_tokens=True)
        assert scored[i] == expected and scored[i].startswith(tokenizer.decode(prefix))
        prefixes.append(prefix)

    grads = []

    def keep_grad(module_, inputs, output):
        if output.requires_grad:
            output.register_hook(grads.append)

    hooks = [m.model.norm.register_forward_hook(keep_grad) for m in (policy, value)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = common.make_scheduler(optimizer, "linear", 0.0, 1)
    module.update(model, optimizer, scheduler, batch, args, amp)
    for h in hooks:
        h.remove()
    context = batch["query"].shape[1]  # the last context token is at context - 1: it predicts the first learner token
    assert len(grads) == 2  # policy and value backbones, one micro-batch
    for g in grads:
        assert g.shape[1] == context + width - 1  # a response's last token is fed to neither model
        assert g[:, :context - 1].abs().max() == 0
        assert (g[:, context - 1].abs().sum(-1) > 0).all()
    return prefixes
