"""Results that used to be wrong on real models: sampling that leaked the checkpoint's generation_config, a reference
at another precision than the policy, REFUEL's per-micro-batch mean, and the calling conventions users bring from
TRL (reward functions with dataset columns as keywords) and transformers (learning-rate schedules)."""

import json
import math
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, GenerationConfig

import common
import embedded
import dpo
import evaluate
import drpo
import ppo
import ppo_plus
import rebel
import refuel
import reward
import sft
from conftest import CPU, REWARDS, read_jsonl, write_jsonl


def metrics(run_dir) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# Sampling: nothing but temperature, whatever the checkpoint's generation_config says
# ----------------------------------------------------------------------------------------------------------------
def test_a_generation_config_that_allows_only_eos_does_not_reach_sampling(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = common.load_tokenizer(tiny_llama)
    eos = tokenizer.eos_token_id
    # A checkpoint whose own sampling settings would force EOS at once and distort every other step.
    model.generation_config = GenerationConfig(
        suppress_tokens=[i for i in range(len(tokenizer)) if i != eos], repetition_penalty=1.5, do_sample=True,
        min_p=0.5, no_repeat_ngram_size=1, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path / "eos_only"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "generation_config.json").read_text())["suppress_tokens"]
    policy = common.load_model(str(folder), CPU)
    query, query_mask = common.left_pad([tokenizer("abc")["input_ids"]] * 16, tokenizer.pad_token_id)
    for temperature in (1.0, 0.0):
        torch.manual_seed(0)
        responses = common.generate(policy, tokenizer, query, query_mask, 10, temperature)
        lengths = common.eos_mask(responses, eos).sum(1).float()
        assert lengths.mean() > 8, temperature  # with the leak every response is the lone EOS (length 1)
    assert policy.generation_config.suppress_tokens  # the model's own config is put back afterwards
    # The samples are those of softmax(logits / T): their log-probs under the scorer match a plain sampler's.
    torch.manual_seed(0)
    plain = common.generate(common.load_model(tiny_llama, CPU), tokenizer, query, query_mask, 10, 1.0)
    torch.manual_seed(0)
    assert torch.equal(common.generate(policy, tokenizer, query, query_mask, 10, 1.0), plain)


# ----------------------------------------------------------------------------------------------------------------
# The reference at the policy's precision: KL exactly 0 before the first update, under bf16 autocast
# ----------------------------------------------------------------------------------------------------------------
def prompt_rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"Say {i}:", "completion": "hello a"} for i in range(n)]


def test_rebel_and_ppo_log_zero_kl_at_the_first_iteration_under_bf16(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", prompt_rows())
    tiny = dict(model=tiny_llama, dataset=data, reward_fn=f"{REWARDS}:fraction_of_a", num_iterations=1,
                batch_size=4, num_minibatches=1, max_new_tokens=6, num_eval_prompts=2, dtype="bfloat16",
                eos_penalty=None)
    rebel.main(rebel.Args(**tiny, output_dir=str(tmp_path / "rebel")))
    ppo.main(ppo.Args(**tiny, num_ppo_epochs=1, output_dir=str(tmp_path / "ppo")))
    for name in ("rebel", "ppo"):
        first = metrics(tmp_path / name)[0]
        assert first["kl"] == 0.0, name  # the old bf16-loaded reference gave a nonzero KL here


def test_refuel_logs_zero_kl_at_the_first_iteration_under_bf16(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": [{"role": "user", "content": f"Hi {i}"}]}
                                                 for i in range(24)])
    refuel.main(refuel.Args(model=tiny_llama, dataset=data, user_fn=f"{REWARDS}:echo_user",
                            reward_fn=f"{REWARDS}:dialogue_fraction_of_a", num_iterations=1, batch_size=4,
                            max_turns=2, max_new_tokens=6, num_eval_prompts=2, grad_accum_steps=1, kl_coef=0.05,
                            dtype="bfloat16", eos_penalty=None, output_dir=str(tmp_path / "refuel")))
    assert metrics(tmp_path / "refuel")[0]["kl"] == 0.0


def test_dpo_implicit_rewards_are_zero_before_training_under_bf16(tiny_llama, tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": "yes a", "rejected": "no"} for i in range(24)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dpo.main(dpo.Args(model=tiny_llama, dataset=data, reward_fn=None, num_epochs=0.2, batch_size=4,
                      num_eval_pairs=4, dtype="bfloat16", output_dir=str(tmp_path / "dpo")))
    final = metrics(tmp_path / "dpo")[-1]
    assert final["eval_chosen_reward_before"] == 0.0 and final["eval_rejected_reward_before"] == 0.0
    assert final["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)


def test_evaluate_gives_zero_kl_for_the_reference_under_another_name(tiny_llama, tmp_path):
    copy = shutil.copytree(tiny_llama, tmp_path / "copy")
    data = write_jsonl(tmp_path / "data.jsonl", prompt_rows(40))  # the last 4 rows are held out
    evaluate.main(evaluate.Args(policy=[str(copy)], reference=tiny_llama, dataset=data, num_prompts=4,
                                reward_fn=f"{REWARDS}:fraction_of_a", max_new_tokens=6, dtype="bfloat16",
                                output_dir=str(tmp_path / "eval")))
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())["policies"][0]
    assert result["kl"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# REFUEL: the loss is the mean over the kept pairs of the whole minibatch, however it is split into micro-batches
# ----------------------------------------------------------------------------------------------------------------
def test_refuel_update_weighs_every_kept_pair_equally_across_micro_batches(tiny_llama):
    torch.manual_seed(0)
    tokenizer = common.load_tokenizer(tiny_llama)
    b = 4  # pairs; rows :b are a, rows b: are a'
    query, query_mask = common.left_pad([tokenizer(f"q{i}")["input_ids"] for i in range(b)] * 2,
                                        tokenizer.pad_token_id)
    responses = torch.randint(10, 60, (2 * b, 5))
    mask = torch.ones_like(responses)
    policy = common.load_model(tiny_llama, CPU)
    with torch.no_grad():
        logp_old = common.logprobs(policy, query, query_mask, responses, mask, 1.0).sum(1)
    # The first micro-batch keeps one pair of two, the second both (the minibatch order is fixed below).
    batch = dict(query=query, query_mask=query_mask, responses=responses, mask=mask, logp_old=logp_old,
                 rewards=torch.tensor([1.0, 0.0, 2.0, -1.0, 0.0, 0.0, 0.0, 0.0]),
                 keep=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    args = refuel.Args(num_passes=1, num_minibatches=1, grad_accum_steps=2, eta=1.0, temperature=1.0)

    # Expected gradient: the regression's mean over the 3 kept pairs, from one forward of the whole batch.
    logp = common.logprobs(policy, query, query_mask, responses, mask, 1.0).sum(1)
    residual = logp[:b] - logp_old[:b] - (logp[b:] - logp_old[b:]) - (batch["rewards"][:b] - batch["rewards"][b:])
    expected_loss = (batch["keep"] * residual ** 2).sum() / 3
    expected = torch.autograd.grad(expected_loss, list(policy.parameters()))

    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    before = [p.detach().clone() for p in policy.parameters()]
    scheduler = common.make_scheduler(optimizer, "constant", 0.0, 1)
    real_randperm = torch.randperm
    try:
        torch.randperm = lambda n, **kw: torch.arange(n)  # micro-batches {0, 1} and {2, 3}
        refuel.update(policy, optimizer, scheduler, batch, args, common.precision("float32", CPU)[1])
    finally:
        torch.randperm = real_randperm
    steps = [b0 - p.detach() for b0, p in zip(before, policy.parameters())]  # SGD, lr 1: the gradient itself
    assert max((s - g).abs().max().item() for s, g in zip(steps, expected)) < 1e-5
    assert max(g.abs().max().item() for g in expected) > 1e-3  # a real gradient, not two zeros


# ----------------------------------------------------------------------------------------------------------------
# TRL's reward-function convention: f(prompts, completions, **columns)
# ----------------------------------------------------------------------------------------------------------------
TRL_STYLE = '''
def exact_answer(completions, answer, **kwargs):
    """Written as for TRL's GRPOTrainer: conversational completions, the dataset's `answer` column as a keyword."""
    return [1.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]


def plain_answer(prompts, completions, answer, **kwargs):
    """The same for plain-text data: prompts and completions are strings."""
    assert all(isinstance(p, str) for p in prompts)
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]
'''


def test_a_trl_reward_function_reads_the_answer_column(tiny_tokenizer, tmp_path):
    (tmp_path / "trl_rewards.py").write_text(TRL_STYLE)
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
                              for i in range(4)])
    rows = common.tokenize_prompts(chat, tiny_tokenizer, 512).to_list()
    assert rows[0]["answer"] == "1"  # the dataset's other columns survive tokenization
    score = common.make_scorer(None, f"{tmp_path}/trl_rewards.py:exact_answer", CPU, torch.float32)
    assert score(rows, ["1", " 2 ", "4", "5"]).tolist() == [1.0, 1.0, 0.0, 0.0]
    plain = Dataset.from_list([{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(3)])
    score = common.make_scorer(None, f"{tmp_path}/trl_rewards.py:plain_answer", CPU, torch.float32)
    assert score(common.tokenize_prompts(plain, tiny_tokenizer, 512).to_list(), ["1", "0", "3"]).tolist() == \
        [1.0, 0.0, 1.0]


def test_refuel_rewards_use_the_same_convention(tmp_path):
    (tmp_path / "dialogue.py").write_text('''
def last_answer(prompts, completions, answer, **kwargs):
    assert all(p[-1]["role"] == "user" for p in prompts)  # the dialogue up to the user's turn-H message
    return [1.0 if c[0]["role"] == "assistant" and c[0]["content"] == a else 0.0 for c, a in zip(completions, answer)]
''')
    args = refuel.Args(reward_fn=f"{tmp_path}/dialogue.py:last_answer")
    score = refuel.make_scorer(args, CPU, torch.float32)
    dialogues = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": x}] for x in ("7", "8")]
    rows = [{"prompt": "Hi", "answer": "7"}, {"prompt": "Hi", "answer": "7"}]
    assert score(dialogues, rows).tolist() == [1.0, 0.0]


def test_the_embedded_rewards_are_trl_style_functions():
    prompt = [{"role": "user", "content": "What is 7 + 5? Answer with just the number."}]
    assert embedded.arithmetic_reward([prompt, prompt], [[{"role": "assistant", "content": "12"}],
                                                       [{"role": "assistant", "content": "13"}]]) == [1.0, 0.0]
    assert embedded.arithmetic_reward(["What is 2 * 3?"], ["It is 6"], answer=["6"]) == [1.0]


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedules from transformers
# ----------------------------------------------------------------------------------------------------------------
def lrs(schedule: str, warmup_ratio: float, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = common.make_scheduler(optimizer, schedule, warmup_ratio, total)
    values = []
    for _ in range(total):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def test_schedules_warm_up_then_decay_as_stated():
    assert lrs("linear", 0.0, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])  # the old hand-written decay
    assert lrs("constant", 0.0, 3) == pytest.approx([1.0, 1.0, 1.0])
    cosine = lrs("cosine", 0.1, 20)  # REFUEL's paper: cosine after 10% warm-up
    assert cosine[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert cosine[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (t - 2) / 18)) for t in range(2, 20)])


@pytest.mark.parametrize("module", [rebel, ppo, ppo_plus, drpo, refuel, sft, dpo, reward])
def test_every_training_script_takes_the_schedule_flags(module):
    fields = {f.name: f for f in module.Args.__dataclass_fields__.values()}
    assert "warmup_ratio" in fields and fields["lr_schedule"].type.__args__ == ("linear", "cosine", "constant")
