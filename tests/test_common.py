"""Unit tests of common.py's helpers, on tiny models loaded through from_pretrained."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import embedded
from conftest import CPU


def hand_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> list[float]:
    """Per-token log-probs the slow way: one unpadded forward per token position."""
    out = []
    for t in range(len(response)):
        ids = torch.tensor([prompt + response[:t]])
        logits = model(input_ids=ids).logits[0, -1].double() / temperature
        out.append((logits.log_softmax(-1)[response[t]]).item())
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_logprobs_match_hand_computation_and_ignore_padding(fixture, request):
    path = request.getfixturevalue(fixture)
    model, tokenizer = common.load_model(path, CPU), common.load_tokenizer(path)
    eos = tokenizer.eos_token_id
    prompts = [tokenizer("What is 1 + 2?")["input_ids"], tokenizer("Hi")["input_ids"]]
    responses = [tokenizer("3")["input_ids"] + [eos], tokenizer("hello")["input_ids"] + [eos]]
    query, query_mask = common.left_pad(prompts, tokenizer.pad_token_id)
    response = common.right_pad(responses, 8, tokenizer.pad_token_id)
    mask = common.eos_mask(response, eos)
    with torch.no_grad():
        got = common.logprobs(model, query, query_mask, response, mask, temperature=0.7)
    for i in range(2):
        expected = hand_logprobs(model, prompts[i], responses[i], 0.7)
        assert got[i, :len(expected)].tolist() == pytest.approx(expected, abs=1e-4)
        assert got[i, len(expected):].abs().sum() == 0  # padding after EOS counts zero
    # The same rows as right-padded prompt+response sequences (no position ids needed) give the same log-probs.
    full = [p + r for p, r in zip(prompts, responses)]
    ids = common.right_pad(full, max(map(len, full)), tokenizer.pad_token_id)
    attention = (torch.arange(ids.shape[1])[None] < torch.tensor([len(f) for f in full])[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits / 0.7
    for i in range(2):
        n = len(prompts[i])
        right = logits[i, n - 1:n - 1 + len(responses[i])].log_softmax(-1)
        right = right.gather(1, torch.tensor(responses[i])[:, None]).squeeze(1)
        assert torch.allclose(right, got[i, :len(responses[i])], atol=1e-5)
    # Micro-batches of one sequence give the same log-probs, and the entropy is that of softmax(logits / T).
    with torch.no_grad():
        chunked, entropy = common.logprobs(model, query, query_mask, response, mask, 0.7, micro_batch=1, entropy=True)
    assert torch.allclose(chunked, got, atol=1e-6)
    assert not common.logprobs(model, query, query_mask, response, mask, 0.7, micro_batch=1).requires_grad  # no graph
    n = len(prompts[0])
    p = logits[0, n - 1].softmax(-1)
    assert entropy[0, 0].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_a_group_of_samples_shares_its_prompts_forward_with_the_same_numbers(fixture, request, monkeypatch):
    """group=n (rows j*b + i hold prompt i, as the scripts lay out a prompt's n samples): each prompt goes through
    the model once and its KV cache serves its n responses. Log-probs, entropies, gradients and sampled tokens are
    those of the plain path; the embedding sees b*Q fewer tokens per extra sample, and never a response's last token
    (its logits would predict nothing); under gradient checkpointing (which drops the cache), or where fewer than
    SHARED_QUERY_MIN_TOKENS would be saved, the plain path runs; rows that do not share their prompt are refused."""
    path = request.getfixturevalue(fixture)
    model, tokenizer = common.load_model(path, CPU), common.load_tokenizer(path)
    eos, b, n, width = tokenizer.eos_token_id, 3, 2, 7
    prompts = [tokenizer(text)["input_ids"] for text in ("What is 1 + 2?", "Hi", "Sort 3 1 2")]
    query, query_mask = common.left_pad(prompts * n, tokenizer.pad_token_id)
    response = torch.randint(10, len(tokenizer), (b * n, width), generator=torch.Generator().manual_seed(0))
    response[1, 3] = eos  # one response ends early: its padding must count zero either way
    response = common.cut_after_eos(response, eos, tokenizer.pad_token_id)
    mask = common.eos_mask(response, eos)
    tokens = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: tokens.append(args[0].numel()))

    def run(group: int, **kwargs):
        tokens.clear()
        out = common.logprobs(model, query, query_mask, response, mask, 0.7, group=group, **kwargs)
        return out, sum(tokens)

    with torch.no_grad():
        (plain, plain_entropy), plain_tokens = run(1, micro_batch=4, entropy=True)
        assert run(n)[1] == plain_tokens  # these prompts are short: sharing would save under 128 tokens
    monkeypatch.setattr(common, "SHARED_QUERY_MIN_TOKENS", b * query.shape[1] - 1)  # all three prompts: just enough
    with torch.no_grad():
        assert run(n, micro_batch=4)[1] == plain_tokens  # 2 prompts a forward save too little: each row whole
        assert run(n)[1] == b * (query.shape[1] + n * (width - 1))  # all 3 in one forward save enough: shared
    monkeypatch.setattr(common, "SHARED_QUERY_MIN_TOKENS", 0)
    with torch.no_grad():
        (shared, entropy), shared_tokens = run(n, micro_batch=4, entropy=True)  # forwards of 2 prompts x 2 rows
        one_prompt_each = run(n, micro_batch=3)[0]  # 3 // 2: forwards of 1 prompt x 2 rows
    assert plain_tokens == b * n * (query.shape[1] + width - 1)
    assert shared_tokens == b * (query.shape[1] + n * (width - 1))
    assert torch.allclose(shared, plain, atol=1e-5) and torch.allclose(one_prompt_each, plain, atol=1e-5)
    assert torch.allclose(entropy, plain_entropy, atol=1e-5) and (shared[1, 4:] == 0).all()
    weights = torch.randn(b * n, width)  # a loss with every row and position weighted differently

    def gradients(group: int) -> torch.Tensor:
        model.zero_grad()
        (run(group)[0] * weights).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model.train()
    plain_grad = gradients(1)
    assert torch.allclose(gradients(n), plain_grad, atol=1e-5 * plain_grad.abs().max().item())
    model = common.wrap(model, CPU, torch.float32, gradient_checkpointing=True)  # no cache: each row whole
    assert torch.allclose(gradients(n), plain_grad, atol=1e-5 * plain_grad.abs().max().item())
    assert sum(tokens) == plain_tokens
    with torch.no_grad():  # a no-grad pass runs in eval mode, where the cache survives checkpointing: shared
        assert torch.allclose(run(n, micro_batch=6)[0], plain, atol=1e-5) and sum(tokens) == shared_tokens
    assert model.training  # and the model is back in train mode
    with pytest.raises(RuntimeError, match="no KV cache"):  # the cache dropped: refused, not scored without prompts
        common.query_cache(model, query, query_mask, n)
    model.eval()
    shuffled = torch.tensor([0, 1, 2, 4, 5, 3])  # row 3 now holds prompt 1, not prompt 0
    with pytest.raises(ValueError, match="group=2"):
        common.logprobs(model, query[shuffled], query_mask[shuffled], response, mask, 0.7, group=n)

    # Sampling: the same tokens for the same seed; the prompt's prefill (all but its last token) runs once.
    steps, config = 12, model.generation_config
    sampled = {}
    for group in (1, n):
        torch.manual_seed(0)
        tokens.clear()
        sampled[group] = common.generate(model, tokenizer, query, query_mask, steps, 1.0, group=group)
        sampled[f"tokens{group}"] = sum(tokens)
    assert torch.equal(sampled[n], sampled[1]) and model.generation_config is config  # the model's own, restored
    assert len(set(map(tuple, sampled[1].tolist()))) == b * n  # sampled, distinct: not a trivial match
    assert sampled["tokens1"] - sampled[f"tokens{n}"] == b * (query.shape[1] - 1)
    greedy = common.generate(model, tokenizer, query, query_mask, steps, 0.0, batch_size=4, group=n)
    assert torch.equal(greedy, common.generate(model, tokenizer, query, query_mask, steps, 0.0))


def test_one_token_responses_score_by_hand_whether_or_not_the_group_shares(tiny_llama, monkeypatch):
    """A one-token response has no token to feed on top of a shared prompt's cache (the last token goes through no
    forward): its log-prob is the prompt's last logits', by hand, with group=2 as with group=1."""
    model, tokenizer = common.load_model(tiny_llama, CPU), common.load_tokenizer(tiny_llama)
    prompts = [tokenizer(text)["input_ids"] for text in ("What is 1 + 2?", "Hi")]
    query, query_mask = common.left_pad(prompts * 2, tokenizer.pad_token_id)
    response = torch.tensor([[11], [12], [13], [14]])
    monkeypatch.setattr(common, "SHARED_QUERY_MIN_TOKENS", 0)  # sharing would be taken for any longer response
    with torch.no_grad():
        shared = common.logprobs(model, query, query_mask, response, torch.ones_like(response), 0.7, group=2)
        plain = common.logprobs(model, query, query_mask, response, torch.ones_like(response), 0.7)
    by_hand = [hand_logprobs(model, prompts[i % 2], [11 + i], 0.7) for i in range(4)]
    assert shared.shape == (4, 1) and torch.allclose(shared, plain, atol=1e-5)
    assert torch.allclose(shared.double(), torch.tensor(by_hand, dtype=torch.double), atol=1e-4)


def test_eos_cut_mask_and_penalty():
    eos, pad = 3, 0
    responses = torch.tensor([[5, 6, 3, 7, 3], [5, 6, 7, 8, 9], [3, 4, 4, 4, 4]])
    assert common.eos_mask(responses, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert common.cut_after_eos(responses, eos, pad).tolist() == [[5, 6, 3, 0, 0], [5, 6, 7, 8, 9], [3, 0, 0, 0, 0]]
    ended = common.has_eos(responses, common.eos_mask(responses, eos), eos)
    assert ended.tolist() == [True, False, True]
    # A per-row budget ends the episode early: row 0's EOS at position 2 lies outside a budget of 2 tokens.
    budget = torch.tensor([2, 5, 1])
    within = common.eos_mask(responses, eos, budget)
    assert within.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert common.has_eos(responses, within, eos).tolist() == [False, False, True]
    # When pad id == EOS id, padding after the first EOS must not extend the mask.
    same = torch.tensor([[5, 3, 3, 3]])
    assert common.eos_mask(same, 3).tolist() == [[1, 1, 0, 0]]


def test_generate_samples_softmax_over_temperature_and_cuts_after_eos(tiny_llama):
    model, tokenizer = common.load_model(tiny_llama, CPU), common.load_tokenizer(tiny_llama)
    eos = tokenizer.eos_token_id
    prompt = tokenizer("abc")["input_ids"]
    query, query_mask = common.left_pad([prompt] * 400, tokenizer.pad_token_id)
    with torch.no_grad():  # lift EOS 3 above the top logit after this prompt
        hidden = model.model(input_ids=query[:1]).last_hidden_state[0, -1]
        logits = model.lm_head(hidden)
        model.lm_head.weight[eos] += (logits.max() - logits[eos] + 3) * hidden / hidden.dot(hidden)
    with torch.no_grad():
        p = (model(input_ids=query[:1]).logits[0, -1] / 0.7).softmax(-1)[eos].item()
    torch.manual_seed(0)
    first = common.generate(model, tokenizer, query, query_mask, max_new_tokens=1, temperature=0.7)[:, 0]
    frequency = (first == eos).float().mean().item()
    assert 0.05 < p < 0.95
    assert abs(frequency - p) < 4 * (p * (1 - p) / 400) ** 0.5  # sampled exactly from softmax(logits / T)
    responses = common.generate(model, tokenizer, query[:32], query_mask[:32], max_new_tokens=12, temperature=0.7)
    assert responses.shape == (32, 12)
    assert common.has_eos(responses, common.eos_mask(responses, eos), eos).any()
    after = common.eos_mask(responses, eos) == 0
    assert after.any() and (responses[after] == tokenizer.pad_token_id).all()
    greedy = common.generate(model, tokenizer, query[:4], query_mask[:4], max_new_tokens=12, temperature=0.0)
    assert (greedy == greedy[0]).all()  # greedy decoding is deterministic


def test_the_inverse_cdf_sampler_draws_softmax_over_temperature():
    """40000 draws over 6 tokens against their softmax(scores / T) probabilities: over the 5 that can come, Pearson's
    chi-square (4 degrees of freedom) stays under its 0.999 quantile, 18.47, for an exact sampler; the sixth, at
    probability 1e-20, never comes."""
    scores = torch.tensor([2.0, 0.0, -1.0, 1.5, -30.0, 0.5]).repeat(40000, 1)
    torch.manual_seed(0)
    out = common.InverseCDFSampler(0.7)(None, scores.clone())
    assert torch.equal((out == 0).sum(1), torch.ones(40000, dtype=torch.long))  # one finite score a row: the pick
    assert torch.isinf(out).sum() == 40000 * 5
    counts = torch.bincount(out.argmax(1), minlength=6).double()
    expected = 40000 * torch.softmax(scores[0].double() / 0.7, 0)
    assert counts[4] == 0 and expected[4] < 1e-15
    seen = expected > 1e-9
    assert ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum() < 18.47
    torch.manual_seed(0)  # the default generator drives it: the same seed, the same picks
    assert torch.equal(common.InverseCDFSampler(0.7)(None, scores.clone()), out)
    far = common.InverseCDFSampler(1e-3)(None, scores[:100].clone())  # a tiny temperature: the argmax, no overflow
    assert (far.argmax(1) == 0).all()


def test_load_model_disables_dropout_and_loads_reward_model(tmp_path, tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path)
    common.load_tokenizer(tiny_llama).save_pretrained(tmp_path)
    # the saved folder really asks for dropout, so the 0.0 below is load_model's doing, not the default
    assert json.load(open(tmp_path / "config.json"))["attention_dropout"] == 0.5
    loaded = common.load_model(str(tmp_path), CPU)
    assert loaded.config.attention_dropout == 0.0
    assert not loaded.training
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():  # even in train mode (the policy is trained in it) two forwards agree: no dropout anywhere
        assert torch.equal(loaded.train()(input_ids=ids).logits, loaded(input_ids=ids).logits)
    value = common.load_model(str(tmp_path), CPU, cls=AutoModelForSequenceClassification, num_labels=1)
    assert value.score.out_features == 1


def test_reward_model_reads_last_real_token_when_pad_is_eos(tiny_reward_model):
    model = common.load_model(tiny_reward_model, CPU, cls=AutoModelForSequenceClassification)
    tokenizer = common.load_tokenizer(tiny_reward_model)
    tokenizer.padding_side = "right"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    texts = ["short<|im_end|>", "a longer text here<|im_end|>"]
    scores = common.reward_model_scores(model, tokenizer, texts)
    for text, score in zip(texts, scores):  # each scored alone, unpadded: the score is at the final token (EOS)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            alone = common.scalar_head(model, ids, torch.ones_like(ids))[0, -1]
        assert score.item() == pytest.approx(alone.item(), abs=1e-5)
    assert common.last_token_index(torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])).tolist() == [1, 3]


def test_reward_fn_from_module_and_file(tmp_path):
    f = common.load_reward_fn("embedded:arithmetic_reward")
    assert f(["What is 3 * 4? Answer with just the number."] * 2, ["It is 12.", "13"]) == [1.0, 0.0]
    path = tmp_path / "my_reward.py"
    path.write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    assert common.load_reward_fn(f"{path}:length")(["p"], ["abc"]) == [3.0]
    with pytest.raises(SystemExit, match="--reward-fn common:nope"):
        common.load_reward_fn("common:nope")
    with pytest.raises(SystemExit, match="--judge-fn nomodule:f"):
        common.load_reward_fn("nomodule:f", "--judge-fn")


def test_arithmetic_task_is_held_out_and_scored():
    data = embedded.arithmetic_dataset(num_train=600, num_test=150)
    train = {row["prompt"][0]["content"] for row in data["train"]}
    test = [row["prompt"][0]["content"] for row in data["test"]]
    assert len(test) == 150 and not train & set(test)
    kinds = [sum(("*" in q) for q in test), sum(("+" in q and int(q.split()[2]) >= 10) for q in test)]
    assert kinds == [50, 50]
    row = data["test"][0]
    answer = row["completion"][0]["content"]
    assert embedded.arithmetic_reward([row["prompt"][0]["content"]] * 3, [answer, f"So: {answer}", "0.5"]) == \
        [1.0, 1.0, float(answer == "5")]
    assert embedded.last_number("1,234 apples") == 1234 and embedded.last_number("none") is None


@pytest.mark.parametrize("row, prompt, reference", [
    ({"prompt": "Q?", "completion": " A"}, "Q?", " A"),
    ({"prompt": "Q?", "chosen": " good", "rejected": " bad"}, "Q?", " good"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "assistant", "content": "A"}]},
     [{"role": "user", "content": "Q?"}], "A"),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
      "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}]},
     [{"role": "user", "content": "Q?"}], "good"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]},
     [{"role": "user", "content": "Q?"}], "A"),
    ({"prompt": "Q?"}, "Q?", None),
])
def test_trl_formats(row, prompt, reference):
    assert common.split_prompt(row) == (prompt, reference)


def test_tokenize_prompts_applies_chat_template(tiny_tokenizer):
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "Hi"}],
                               "completion": [{"role": "assistant", "content": "yo"}]}])
    row = common.tokenize_prompts(data, tiny_tokenizer, max_prompt_length=512)[0]
    assert row["prompt_text"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(row["input_ids"]) == row["prompt_text"]
    assert row["reference_ids"] == tiny_tokenizer("yo")["input_ids"] + [tiny_tokenizer.eos_token_id]
    short = common.tokenize_prompts(data, tiny_tokenizer, max_prompt_length=5)[0]
    assert short["input_ids"] == row["input_ids"][-5:]  # left truncation keeps the generation prompt


def test_missing_column_and_empty_split_fail_with_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hello"}\n')
    with pytest.raises(SystemExit) as e:  # load_splits checks the columns the script needs
        common.load_splits(str(path), "train", "test", 10)
    assert "needs a 'prompt', 'messages' or 'chosen' column" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="needs a 'completion' or 'chosen' column"):
        common.check_columns(Dataset.from_list([{"prompt": "x"}]), "d", columns="reference")
    with pytest.raises(SystemExit, match="needs a 'rejected' column"):
        common.check_columns(Dataset.from_list([{"chosen": "x"}]), "d", columns="preference")
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt\n")
    with pytest.raises(SystemExit, match="has no rows"):
        common.load_splits(str(empty), "train", "test", 10)
    with pytest.raises(SystemExit, match="--train-split nope"):
        common.load_splits(str(path), "nope", "test", 10)


def test_prompt_batches_cover_the_same_global_batch_for_any_world_size(monkeypatch):
    data = Dataset.from_list([{"i": i} for i in range(20)])
    single = next(common.prompt_batches(data, 8, seed=3))
    shares = []
    for rank in range(2):
        monkeypatch.setattr(common.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(common.dist, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(common.dist, "get_world_size", lambda: 2)
        shares.append(next(common.prompt_batches(data, 8, seed=3)))
    assert len(shares[0]) == len(shares[1]) == 4
    assert sorted(r["i"] for r in shares[0] + shares[1]) == sorted(r["i"] for r in single)
    monkeypatch.undo()
    batches = common.prompt_batches(data, 8, seed=3)
    epoch = [r["i"] for _ in range(2) for r in next(batches)]
    assert len(set(epoch)) == 16  # no repeats within an epoch


def test_save_model_round_trips(tmp_path, tiny_llama):
    model, tokenizer = common.load_model(tiny_llama, CPU), common.load_tokenizer(tiny_llama)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    common.save_model(model, tokenizer, str(tmp_path / "out"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("tmp")) == []


def test_evaluate_scores_greedy_responses_from_bare_prompts(tiny_llama, tmp_path):
    model, tokenizer = common.load_model(tiny_llama, CPU), common.load_tokenizer(tiny_llama)
    data = common.tokenize_prompts(embedded.arithmetic_dataset(num_train=3, num_test=9)["test"], tokenizer, 512)
    seen = []

    def score(rows, responses):
        seen.extend(r["prompt_text"] for r in rows)
        return torch.tensor([float(len(r)) for r in responses])

    result = common.score_held_out(model, tokenizer, data, score, max_new_tokens=6, temperature=0.0, batch_size=4,
                             device=CPU)
    assert seen == data["prompt_text"]
    query, mask = common.left_pad(data["input_ids"], tokenizer.pad_token_id)
    responses = common.generate(model, tokenizer, query, mask, 6, 0.0)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    assert result["score"] == pytest.approx(sum(map(len, texts)) / 9)


def test_reward_model_reads_plain_text_up_to_eos_and_conversations_through_its_template(tiny_tokenizer):
    plain = common.reward_model_texts(["TL;DR:"], ["TL;DR:"], [" a summary"], tiny_tokenizer)
    assert plain == ["TL;DR: a summary<|im_end|>"]
    chat = common.reward_model_texts([[{"role": "user", "content": "Hi"}]], ["ignored"], ["yo"], tiny_tokenizer)
    assert chat == ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"]


def test_flag_checks_name_the_flag_at_fault():
    class Args:
        batch_size, num_minibatches, grad_accum_steps, lr = 12, 2, 4, 0.0

    with pytest.raises(SystemExit, match=r"^error: --lr must be positive, got 0.0$"):
        common.check_flags(Args, 1, positive=("num_minibatches",))
    Args.lr = 1e-5
    with pytest.raises(SystemExit, match=r"^error: --num-minibatches must be positive, got 0$"):
        Args.num_minibatches = 0
        common.check_flags(Args, 1, positive=("num_minibatches",))
    Args.num_minibatches = 2
    common.check_flags(Args, 1, batch_split=("num_minibatches",))  # 12 = 1 x 2 x 6
    with pytest.raises(SystemExit, match=r"processes \(1\) x --num-minibatches \(2\) x --grad-accum-steps \(4\)$"):
        common.check_flags(Args, 1, batch_split=("num_minibatches", "grad_accum_steps"))
