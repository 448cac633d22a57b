"""evaluate.py: the win rate is the hand count of a fixed judge function, positions are randomised, KL is 0 against
itself, reward and length are the samples' means, the plot, a judge model, a missing column."""

import importlib.util
import json

import pytest
import torch
import tyro
from transformers import LlamaForCausalLM

import evaluate
from conftest import llama_config, make_tokenizer, read_jsonl, save, write_jsonl
from pipeline_fns import always_a, always_b, longer_wins, no_answer


def qa_rows(n: int) -> list[dict]:
    """Conversational prompts with reference completions of varied lengths."""
    return [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "completion": [{"role": "assistant", "content": "r" * (i % 13)}]} for i in range(n)]


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory) -> str:
    """A second tiny Llama policy (different weights, same tokenizer as tiny_llama)."""
    torch.manual_seed(7)
    tokenizer = make_tokenizer()
    return save(LlamaForCausalLM(llama_config(tokenizer)), tokenizer, tmp_path_factory.mktemp("other_llama"))


def test_win_rate_is_the_hand_count_of_a_fixed_judge():
    responses = ["aaaa", "b", "ccc", "dddddd", "e", "ffff", "gg", "hhhhhhh"]
    references = ["x", "yyyy", "zz", "w", "vvvvv", "uuu", "ttttt", "ss"]
    # longer wins, and no pair ties, so the positions cannot matter: the policy is longer at 0, 2, 3, 5, 7
    result = evaluate.win_rate(longer_wins, ["p"] * 8, responses, references, seed=0)
    assert result["win_rate"] == 5 / 8 and result["ties"] == 0
    assert result["wins"] == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_positions_are_randomised_and_unparsed_answers_are_ties():
    responses, references = [f"p{i}" for i in range(40)], [f"r{i}" for i in range(40)]
    first = evaluate.win_rate(always_a, ["p"] * 40, responses, references, seed=3)
    second = evaluate.win_rate(always_b, ["p"] * 40, responses, references, seed=3)
    # "always A" wins exactly where the policy was put first: both positions occur, and the two judges add up to 1
    assert first["win_rate"] == sum(first["policy_is_a"]) / 40
    assert 0.2 < first["win_rate"] < 0.8
    assert first["win_rate"] + second["win_rate"] == pytest.approx(1.0)
    assert evaluate.win_rate(always_a, ["p"] * 40, responses, references, seed=3)["policy_is_a"] == \
        first["policy_is_a"]  # fixed seed, same positions
    tied = evaluate.win_rate(no_answer, ["p"] * 40, responses, references, seed=3)
    assert tied["win_rate"] == 0.5 and tied["ties"] == 40
    assert [evaluate.parse_choice(s) for s in ("B", "Preferred: A", "a b", "Summary B.", "")] == \
        ["B", "A", None, "B", None]


def test_parse_choice_reads_the_verdict_line_of_the_seed_prompts():
    # a comparison sentence naming both A and B (A first) above the verdict: the verdict line decides
    assert evaluate.parse_choice("Comparison: Summary A misses the point that Summary B states clearly.\n"
                                 "Preferred: B") == "B"
    assert evaluate.parse_choice("Comparison: A is vaguer than B, and B is longer.\nMore helpful: A\n") == "A"
    assert evaluate.parse_choice("Comparison: Response A rambles while B is direct.\n\nB") == "B"  # no marker
    # the choice in quotes, or on the line after the marker; the last marker counts
    assert evaluate.parse_choice('Comparison: B is concise; A is not.\nPreferred: "A"') == "A"
    assert evaluate.parse_choice('Comparison: A is better than B.\nPreferred:\n"B"') == "B"
    assert evaluate.parse_choice('I am told to write Preferred: <"A" or "B">.\nPreferred: B') == "B"
    # neither: a verdict line naming no choice, or an answer cut off before it (even if the comparison names one)
    assert evaluate.parse_choice("Comparison: both are fine.\nPreferred: neither") is None
    assert evaluate.parse_choice("Comparison: A is clearer than") is None
    assert evaluate.parse_choice("Comparison: Summary A is better.\nPreferred:") is None


def test_judge_prompt_names_resolve_to_the_seed_templates():
    tldr = tyro.cli(evaluate.Args, args=["--policy", "p", "--judge-prompt", "tldr"])
    template = evaluate.judge_template(tldr.judge_prompt)
    assert template == evaluate.JUDGE_PROMPTS["tldr"] and template.startswith("Which of the following summaries")
    assert template.endswith('Comparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">')
    assert evaluate.judge_tokens(tldr) == 128  # room for the comparison sentence
    hh = evaluate.judge_template("hh")
    assert hh.startswith("For the following query to a chatbot") and hh.endswith('More helpful: <"A" or "B">')
    filled = hh.format(prompt="Q?", a="first", b="second")
    assert "Query: Q?" in filled and "Response A:\nfirst" in filled and "Response B:\nsecond" in filled
    short = tyro.cli(evaluate.Args, args=["--policy", "p"])  # the default: the short question, 8 tokens
    assert evaluate.judge_template(short.judge_prompt) == evaluate.JUDGE_PROMPTS["dpo"]
    assert evaluate.judge_tokens(short) == 8
    literal = tyro.cli(evaluate.Args, args=["--policy", "p", "--judge-prompt", "Q {prompt} {a} {b}",
                                            "--judge-max-new-tokens", "3"])
    assert evaluate.judge_template(literal.judge_prompt) == "Q {prompt} {a} {b}" and evaluate.judge_tokens(literal) == 3
    # an HH dialogue reaches the judge with its turns labelled; a single message as its text
    dialogue = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Help?"}]
    assert evaluate.plain_text(dialogue) == "User: Hi\n\nAssistant: Hello\n\nUser: Help?"
    assert evaluate.plain_text(dialogue[:1]) == "Hi"


def test_evaluate_two_policies(tiny_llama, other_llama, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(200))  # no test split: the last 12 rows are held out
    out = tmp_path / "eval"
    evaluate.main(evaluate.Args(policy=[tiny_llama, other_llama], reference=tiny_llama, dataset=data,
                                num_prompts=12, reward_fn="tests/pipeline_fns.py:response_length",
                                judge_fn="tests/pipeline_fns.py:longer_wins", max_new_tokens=8,
                                output_dir=str(out)))
    summary = json.loads((out / "eval.json").read_text())
    samples = read_jsonl(out / "samples.jsonl")
    assert [r["policy"] for r in summary["policies"]] == [tiny_llama, other_llama]
    assert summary["num_prompts"] == 12 and len(samples) == 24
    same, other = summary["policies"]
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference against itself
    assert other["kl"] > 0.1  # two different random models disagree
    for result in summary["policies"]:
        mine = [s for s in samples if s["policy"] == result["policy"]]
        # reward = the reward function's mean over the samples; length counts tokens (one per character here)
        assert result["reward"] == pytest.approx(sum(len(s["response"]) for s in mine) / 12)
        assert result["length"] >= result["reward"]
        # the hand count: the longer response wins; a tie goes to whichever sits in position A
        hand = sum(len(s["response"]) > len(s["reference"]) or
                   (len(s["response"]) == len(s["reference"]) and s["policy_is_a"]) for s in mine)
        assert result["win_rate"] == hand / 12
        assert [s["reference"] for s in mine] == ["r" * (i % 13) for i in range(188, 200)]  # held-out rows
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (out / "reward_vs_kl.png").exists() == has_matplotlib


def test_a_chat_model_judges(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))  # the last 4 rows are held out
    out = tmp_path / "eval"
    evaluate.main(evaluate.Args(policy=[tiny_llama], reference=tiny_llama, dataset=data, num_prompts=4,
                                reward_fn="tests/pipeline_fns.py:response_length", judge_model=tiny_llama,
                                judge_max_new_tokens=4, max_new_tokens=4, judge_prompt="tldr", output_dir=str(out)))
    summary = json.loads((out / "eval.json").read_text())
    (result,) = summary["policies"]
    assert summary["judge_prompt"] == evaluate.JUDGE_PROMPTS["tldr"]  # the template the judge saw, by name or text
    samples = read_jsonl(out / "samples.jsonl")
    # whatever a random judge writes, the win rate is the mean of its parsed verdicts
    verdicts = [evaluate.parse_choice(s["judge_answer"]) for s in samples]
    assert result["judge_ties"] == verdicts.count(None)
    assert result["win_rate"] == sum(0.5 if v is None else float((v == "A") == s["policy_is_a"])
                                     for v, s in zip(verdicts, samples)) / 4


def test_judging_without_reference_responses_is_one_clear_line(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Q?"}] * 20)
    with pytest.raises(SystemExit) as error:
        evaluate.main(evaluate.Args(policy=["no/such-model"], reference="no/such-model", dataset=data,
                                    reward_fn="tests/pipeline_fns.py:response_length",
                                    judge_fn="tests/pipeline_fns.py:longer_wins", output_dir=str(tmp_path / "o")))
    message = str(error.value)
    assert message.startswith("error: ") and "'completion'" in message and "\n" not in message
