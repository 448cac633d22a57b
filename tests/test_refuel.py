"""refuel.py on tiny random models: the turn-h tokens, the (H, h) draws, the shared history of the two futures, both
kinds of user through one rollout, the loss, the embedded task's user and reward, and learning end to end."""

import json
import random

import pytest
import torch

import common
import embedded
import refuel
from conftest import CPU, REWARDS, read_jsonl


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chatml_ids(tokenizer, *parts: str) -> list[int]:
    """Token ids written by hand for the conftest tokenizer: ChatML specials as one token, everything else by char."""
    specials = {"<|im_start|>", "<|im_end|>"}
    return [tokenizer.convert_tokens_to_ids(t) for p in parts for t in ([p] if p in specials else list(p))]


def first_turns(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"hi {i}"}]} for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# The turn-h tokens: query = history + generation prompt, response = the answer and its end-of-turn token
# ----------------------------------------------------------------------------------------------------------------
def test_turn_h_tokens_match_the_chatml_template_token_by_token(tiny_llama):
    tokenizer = common.load_tokenizer(tiny_llama)
    history = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
               {"role": "user", "content": "Now add 4 to that."}]
    answer = tokenizer("9", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    cut_answer = tokenizer("abcdefgh", add_special_tokens=False)["input_ids"]  # ran out of tokens: no EOS
    turns = [(refuel.turn_query(tokenizer, history, 1024), answer),
             (refuel.turn_query(tokenizer, history[:1], 1024), cut_answer)]
    query, query_mask, responses, mask = refuel.turn_tensors(turns, tokenizer.pad_token_id, 8, CPU)

    expected_query = chatml_ids(tokenizer, "<|im_start|>", "user\nWhat is 2 + 3?", "<|im_end|>", "\n",
                                "<|im_start|>", "assistant\n5", "<|im_end|>", "\n",
                                "<|im_start|>", "user\nNow add 4 to that.", "<|im_end|>", "\n",
                                "<|im_start|>", "assistant\n")
    assert query[0][query_mask[0] == 1].tolist() == expected_query
    assert query_mask[0].all()  # the longest query: no left padding
    assert responses[0].tolist() == chatml_ids(tokenizer, "9", "<|im_end|>") + [tokenizer.pad_token_id] * 6
    assert mask[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]  # "9" and the end-of-turn EOS, nothing else
    # In the whole dialogue rendered by the template, the turn-h answer's tokens are exactly these two.
    rendered = tokenizer(tokenizer.apply_chat_template(history + [{"role": "assistant", "content": "9"}],
                                                       tokenize=False), add_special_tokens=False)["input_ids"]
    assert rendered == expected_query + chatml_ids(tokenizer, "9", "<|im_end|>", "\n")
    # A shorter history is left-padded; an answer that ran out of tokens is all response, no EOS.
    short = chatml_ids(tokenizer, "<|im_start|>", "user\nWhat is 2 + 3?", "<|im_end|>", "\n",
                       "<|im_start|>", "assistant\n")
    assert query_mask[1].tolist() == [0] * (len(expected_query) - len(short)) + [1] * len(short)
    assert query[1][query_mask[1] == 1].tolist() == short
    assert responses[1].tolist() == chatml_ids(tokenizer, "abcdefgh") and mask[1].tolist() == [1] * 8


# ----------------------------------------------------------------------------------------------------------------
# H ~ U{1..H_max}, h ~ U{1..H}
# ----------------------------------------------------------------------------------------------------------------
def chi_square(pairs: list[tuple[int, int]], max_turns: int) -> float:
    """Pearson's statistic of the (H, h) counts against P(H, h) = 1/max_turns * 1/H for 1 <= h <= H."""
    n, stat = len(pairs), 0.0
    for horizon in range(1, max_turns + 1):
        for h in range(1, horizon + 1):
            expected = n / max_turns / horizon
            stat += (pairs.count((horizon, h)) - expected) ** 2 / expected
    return stat


def test_horizon_and_reset_turn_are_drawn_as_specified():
    random.seed(0)
    horizons, resets = refuel.draw_turns(20000, 5)
    pairs = list(zip(horizons, resets))
    assert all(1 <= h <= horizon <= 5 for horizon, h in pairs)
    # 15 cells, 14 degrees of freedom: the 0.999 quantile of chi^2(14) is 36.12.
    assert chi_square(pairs, 5) < 36.12
    # The test has power: (H, h) uniform over the 15 valid pairs (a plausible bug) is rejected by a wide margin.
    random.seed(0)
    valid = [(horizon, h) for horizon in range(1, 6) for h in range(1, horizon + 1)]
    assert chi_square([random.choice(valid) for _ in range(20000)], 5) > 10 * 36.12
    # And the marginal of h: P(h = j) = 1/5 sum_{H >= j} 1/H (h = 1 in 45.7% of the draws).
    assert abs(resets.count(1) / 20000 - sum(1 / k for k in range(1, 6)) / 5) < 0.01
    # --reset-turn last (the single-turn REBEL baseline): h = H always, H still uniform over {1..5}.
    random.seed(0)
    horizons, resets = refuel.draw_turns(20000, 5, last=True)
    assert resets == horizons and all(abs(horizons.count(k) / 20000 - 0.2) < 0.01 for k in range(1, 6))


# ----------------------------------------------------------------------------------------------------------------
# Rollout: the two futures share the history up to the user's turn-h message; a rule and an LLM user, one code path
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rule", "llm"])
def test_futures_share_the_history_up_to_turn_h(kind, tiny_llama, tiny_gpt2, tiny_reward_model):
    args = refuel.Args(model=tiny_llama, max_turns=3, max_new_tokens=8, user_max_new_tokens=8,
                       user_fn=f"{REWARDS}:echo_user", reward_fn=f"{REWARDS}:dialogue_fraction_of_a",
                       user_model=tiny_gpt2 if kind == "llm" else None, eos_penalty=-7.0 if kind == "llm" else None,
                       reward_model=tiny_reward_model if kind == "llm" else None)
    tokenizer = common.load_tokenizer(tiny_llama)
    policy = common.load_model(tiny_llama, CPU)
    user, score = refuel.make_user(args, CPU, torch.float32), refuel.make_scorer(args, CPU, torch.float32)
    assert isinstance(user, refuel.LLMUser) == (kind == "llm")
    random.seed(0)
    torch.manual_seed(0)
    b = 12
    rows = first_turns(b)
    batch = refuel.rollout(policy, None, tokenizer, user, score, rows, args, common.precision("float32", CPU)[1])
    dialogues = batch["dialogues"]
    assert len(dialogues) == 2 * b and len(batch["rewards"]) == 2 * b
    for i in range(b):
        horizon, h = batch["horizons"][i], batch["resets"][i]
        for d in (dialogues[i], dialogues[i + b]):
            assert [m["role"] for m in d] == ["user", "assistant"] * horizon  # played to turn H, truncated there
            assert d[0] == rows[i]["prompt"][0]
            assert all(isinstance(m["content"], str) for m in d)
        # Shared history: the first h-1 turns and the user's turn-h message, message by message and token by token.
        assert dialogues[i][:2 * h - 1] == dialogues[i + b][:2 * h - 1]
        assert torch.equal(batch["query"][i], batch["query"][i + b])
        assert torch.equal(batch["query_mask"][i], batch["query_mask"][i + b])
        query = batch["query"][i][batch["query_mask"][i] == 1].tolist()
        assert query == refuel.turn_query(tokenizer, dialogues[i][:2 * h - 1], args.max_prompt_length)
        # The response is each future's turn-h answer: the mask is a prefix, ending at the first EOS if there is one.
        for row in (i, i + b):
            mask, response = batch["mask"][row], batch["responses"][row]
            n = int(mask.sum())
            assert mask.tolist() == [1] * n + [0] * (len(mask) - n)
            answer = response[:n].tolist()
            assert tokenizer.eos_token_id not in answer[:-1]
            assert n == len(mask) or answer[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(answer, skip_special_tokens=True) == dialogues[row][2 * h - 1]["content"]
        same = batch["mask"][i].sum() == batch["mask"][i + b].sum() and torch.equal(
            batch["responses"][i][batch["mask"][i] == 1], batch["responses"][i + b][batch["mask"][i + b] == 1])
        assert batch["keep"][i].item() == float(not same)
    # Rewards: the scores of the dialogues truncated at H; with an EOS penalty, the penalty where a future's answer
    # ran out of tokens (certainly where its turn-h answer did).
    expected = score(dialogues, rows * 2)
    assert torch.equal(batch["rewards"], batch["scores"])  # kl_coef 0
    if args.eos_penalty is None:
        assert torch.allclose(batch["scores"], expected)
    else:
        turn_h_ended = (batch["responses"] == tokenizer.eos_token_id).any(1)
        penalised = batch["scores"] == args.eos_penalty
        assert (penalised | torch.isclose(batch["scores"], expected)).all()
        assert penalised[~turn_h_ended].all() and (~turn_h_ended).any()
        assert torch.equal(penalised, batch["ended"] == 0)  # ended: every answer of the future ended
    assert batch["keep"].sum() >= b // 2  # sampled at T = 0.8: most turn-h answers differ
    assert sorted(set(batch["horizons"])) == [1, 2, 3]
    # The recorded log-probs are pi_t's on exactly these tokens.
    logp = common.logprobs(policy, batch["query"], batch["query_mask"], batch["responses"], batch["mask"],
                                    args.temperature).sum(1)
    assert torch.allclose(logp, batch["logp_old"], atol=1e-4)
    # The update's signal_fraction: the share of kept pairs whose two futures' rewards differ.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)
    stats = refuel.update(policy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), batch,
                          args, common.precision("float32", CPU)[1])
    differ = (batch["rewards"][:b] != batch["rewards"][b:])[batch["keep"].bool()]
    assert stats["signal_fraction"].item() == pytest.approx(differ.float().mean().item())


# ----------------------------------------------------------------------------------------------------------------
# The LLM user's prompt and the message kept from its text
# ----------------------------------------------------------------------------------------------------------------
def test_llm_user_message_is_the_text_after_the_last_question_marker(tiny_gpt2):
    assert refuel.user_message("The user wants a number next.\nQuestion:  What is 12 times 3?\n") == \
        "What is 12 times 3?"
    # a marker inside the justification: the last one starts the message
    assert refuel.user_message("They asked a Question: about sums, so now products.\nQuestion: And 4 x 5?") == \
        "And 4 x 5?"
    assert refuel.user_message("  Can you explain that again?\n") == "Can you explain that again?"  # no marker
    assert refuel.user_message("Justified.\nQuestion:") == ""  # cut off right after the marker: nothing to ask
    # --user-prompt names a template (default: the justification-then-question one) or is the template itself
    args = refuel.Args(user_model=tiny_gpt2)
    assert args.user_prompt == "refuel" and refuel.make_user(args, CPU, torch.float32).prompt == \
        refuel.USER_PROMPTS["refuel"]
    assert '"Question:"' in refuel.USER_PROMPTS["refuel"] and "{conversation}" in refuel.USER_PROMPTS["plain"]
    plain = refuel.make_user(refuel.Args(user_model=tiny_gpt2, user_prompt="plain"), CPU, torch.float32)
    assert plain.prompt.endswith("Reply with the message only.")
    refuel.check_args(refuel.Args(user_prompt="plain"), 1)
    with pytest.raises(SystemExit, match="--user-prompt must contain {conversation}"):
        refuel.check_args(refuel.Args(user_prompt="Ask something."), 1)


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------
def test_loss_is_the_rebel_regression_on_kept_pairs():
    logp = torch.tensor([-1.0, -2.0, -4.0], requires_grad=True)
    logp_old, logp_pair, logp_pair_old = torch.tensor([-1.5, -2.0, -4.0]), torch.tensor([-3.0, -1.0, -4.0]), \
        torch.tensor([-2.0, -1.5, -4.0])
    reward, reward_pair = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 1.0])
    # residuals: (0.5 - (-1.0) - 2 * 1) = -0.5 ; (0 - 0.5 - 0) = -0.5 ; dropped pair (would be 0 - 0 - 2 = -2)
    loss = refuel.refuel_loss(logp, logp_old, logp_pair, logp_pair_old, reward, reward_pair, 2.0,
                              torch.tensor([1.0, 1.0, 0.0]))
    assert loss.item() == pytest.approx((0.25 + 0.25) / 2)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([2 * -0.5 / 2, 2 * -0.5 / 2, 0.0])
    kept_all = refuel.refuel_loss(logp, logp_old, logp_pair, logp_pair_old, reward, reward_pair, 2.0, torch.ones(3))
    assert kept_all.item() == pytest.approx((0.25 + 0.25 + 4.0) / 3)


# ----------------------------------------------------------------------------------------------------------------
# The embedded task: a rule user that builds on the last answer, and a reward that follows the chain
# ----------------------------------------------------------------------------------------------------------------
def test_arithmetic_user_and_chain_reward():
    first = [{"role": "user", "content": "What is 7 + 5? Answer with just the number."}]
    asked = embedded.arithmetic_user([first + [{"role": "assistant", "content": "12"}]])[0]
    assert asked == embedded.arithmetic_user([first + [{"role": "assistant", "content": "99"}]])[0]  # same follow-up
    right = first + [{"role": "assistant", "content": "12"}, {"role": "user", "content": "Now add 4 to that."},
                     {"role": "assistant", "content": "That gives 16."},
                     {"role": "user", "content": "Now multiply that by 3."}, {"role": "assistant", "content": "48"}]
    def reward(conversations):  # as make_scorer calls it: TRL's conversational prompts and completions
        return embedded.arithmetic_chain_reward([c[:-1] for c in conversations], [c[-1:] for c in conversations])

    assert reward([refuel.up_to_turn(right, t) for t in (1, 2, 3)]) == [1.0, 1.0, 1.0]
    # An early mistake costs later turns: 13 + 4 = 17 follows the assistant, not the chain.
    wrong = first + [{"role": "assistant", "content": "13"}, right[2], {"role": "assistant", "content": "17"}]
    assert reward([wrong]) == [0.0]
    answered = first + [{"role": "assistant", "content": "12"}, {"role": "user", "content": asked}]
    assert embedded.arithmetic_chain(answered) in {12 + k for k in range(1, 10)} | {24, 36}
    # Follow-ups of many dialogues: about two in three are additions; the chain always parses.
    users = embedded.arithmetic_user([[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(300)])
    assert 0.55 < sum(u.startswith("Now add") for u in users) / 300 < 0.78


# ----------------------------------------------------------------------------------------------------------------
# Learning: main() end to end on a tiny random model and a learnable multi-turn reward
# ----------------------------------------------------------------------------------------------------------------
def test_reward_rises(tiny_llama, tmp_path):
    data = tmp_path / "firsts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in first_turns(64)))
    out = tmp_path / "run"
    refuel.main(refuel.Args(model=tiny_llama, dataset=str(data), user_fn=f"{REWARDS}:echo_user",
                            reward_fn=f"{REWARDS}:dialogue_fraction_of_a", max_turns=3, num_iterations=12,
                            batch_size=16, max_new_tokens=8, lr=3e-3, eta=20.0, num_eval_prompts=8,
                            eos_penalty=None, output_dir=str(out), seed=1))
    lines = read_jsonl(out / "metrics.jsonl")
    scores = [line["score"] for line in lines if "score" in line]
    evals = lines[-1]
    assert len(scores) == 12
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    # A random policy writes 'a' about 1 character in 100; the sampled (T = 0.8) fraction at least doubles.
    print(f"score: first 3 iterations {first:.4f}, last 3 {last:.4f}; eval {evals}")
    assert first < 0.015 and last > first + 0.01, (first, last)
    # Greedy evaluation at every turn: no 'a' before; 'a' is the argmax after.
    assert all(evals[f"eval_turn{t}_before"] < 0.1 for t in (1, 2, 3))
    assert all(evals[f"eval_turn{t}_after"] > 0.5 for t in (1, 2, 3)), evals
    assert (out / "config.json").exists()


def test_first_turn_of_each_dataset_format():
    system, question = {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}
    dialogue = [system, question, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"},
                {"role": "assistant", "content": "sure"}]
    assert refuel.first_turn({"messages": dialogue}) == [system, question]  # a whole dialogue: its opening
    assert refuel.first_turn({"chosen": dialogue[1:], "rejected": dialogue[1:]}) == [question]
    assert refuel.first_turn({"prompt": "hi"}) == [question]
    assert refuel.first_turn({"prompt": [system, question]}) == [system, question]
