"""CleanRL-style smoke tests: every script run as a user runs it (`python X.py --model <tiny model> ...` in a
subprocess, offline), for the smallest run that still makes one full iteration or optimizer step, evaluates before
and after, and saves. Each must exit 0 and leave an output that loads: the trained model and its tokenizer through
`from_pretrained`, and a metrics.jsonl whose last line holds the before/after evaluation (evaluate.py: an eval.json
listing every policy)."""

import json
import subprocess
import sys

import pytest
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import dpo
import drpo
import ppo
import ppo_plus
import rebel
import refuel
import reward
import sft
from conftest import ENV, REWARDS, ROOT, read_jsonl, write_jsonl, write_prompts

FRACTION_OF_A = f"{REWARDS}:fraction_of_a"
# 20 rows: a local file has one split, so its last 2 rows (--num-eval-* 2) are held out and 18 remain to train on
ROWS = 20
ONE_ITERATION = ["--num-iterations", "1", "--batch-size", "2", "--num-minibatches", "1", "--max-new-tokens", "4",
                 "--num-eval-prompts", "2", "--micro-batch-size", "4"]
PPO = ONE_ITERATION + ["--num-ppo-epochs", "1", "--reward-fn", FRACTION_OF_A]
ONE_STEP = ["--batch-size", "2", "--micro-batch-size", "4"]  # a dataset of 18 rows at 0.03 epochs: one step
EVAL_SCORE = ["--max-new-tokens", "4", "--max-response-length", "8", "--reward-fn", FRACTION_OF_A]
# script: (dataset, --model fixture, flags)
TRAINING = {rebel: ("prompts", "tiny_llama", ONE_ITERATION + ["--num-passes", "1", "--reward-fn", FRACTION_OF_A]),
            ppo: ("prompts", "tiny_llama", PPO),
            ppo_plus: ("prompts", "tiny_llama", PPO),
            drpo: ("prompts", "tiny_llama", PPO),
            refuel: ("dialogues", "tiny_llama", ONE_ITERATION + [
                "--num-passes", "1", "--grad-accum-steps", "1", "--max-turns", "2", "--user-fn",
                f"{REWARDS}:echo_user", "--reward-fn", f"{REWARDS}:dialogue_fraction_of_a"]),
            sft: ("prompts", "tiny_llama", ONE_STEP + EVAL_SCORE + ["--num-eval-prompts", "2"]),
            dpo: ("pairs", "tiny_llama", ONE_STEP + EVAL_SCORE + ["--num-eval-pairs", "2"]),
            reward: ("pairs", "tiny_gpt2", ONE_STEP + ["--num-eval-pairs", "2"])}


def name(module) -> str:
    return module.__name__


def datasets(tmp_path) -> dict[str, str]:
    """The three dataset shapes the scripts read: prompt/completion, conversational first turns, preference pairs."""
    return {"prompts": write_prompts(tmp_path / "prompts.jsonl", ROWS),
            "dialogues": write_jsonl(tmp_path / "dialogues.jsonl",
                                     [{"prompt": [{"role": "user", "content": f"Hi {i}"}]} for i in range(ROWS)]),
            "pairs": write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Count: {i}", "chosen": f" {i + 1}",
                                                             "rejected": f" {i + 2}"} for i in range(ROWS)])}


def run_script(script: str, *flags: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python script flags...` from the repository root, offline; it must exit 0."""
    result = subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("module", list(TRAINING), ids=name)
def test_training_script_runs_and_saves_a_loadable_model(module, tmp_path, request):
    data, base, flags = TRAINING[module]
    base = request.getfixturevalue(base)
    out = tmp_path / "out"
    run_script(f"{name(module)}.py", "--model", base, "--dataset", datasets(tmp_path)[data], "--output-dir", str(out),
               *flags)

    cls = AutoModelForSequenceClassification if module is reward else AutoModelForCausalLM
    model = cls.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == len(AutoTokenizer.from_pretrained(base))
    if module is reward:
        assert model.config.num_labels == 1

    final = read_jsonl(out / "metrics.jsonl")[-1]
    before = {k[:-len("_before")] for k in final if k.endswith("_before")}
    after = {k[:-len("_after")] for k in final if k.endswith("_after")}
    assert before and before == after, sorted(final)


def test_evaluate_script_runs_and_lists_every_policy(tiny_llama, tiny_gpt2, tmp_path):
    out = tmp_path / "eval"
    run_script("evaluate.py", "--policy", tiny_llama, tiny_gpt2, "--reference", tiny_llama,
               "--dataset", datasets(tmp_path)["prompts"], "--num-prompts", "2", "--max-new-tokens", "4",
               "--micro-batch-size", "4", "--reward-fn", FRACTION_OF_A, "--output-dir", str(out))
    result = json.loads((out / "eval.json").read_text())
    policies = [p["policy"] for p in result["policies"]]
    assert policies == [tiny_llama, tiny_gpt2]
    assert result["reference"] == tiny_llama and result["policies"][0]["kl"] == 0.0


@pytest.mark.parametrize("module", list(TRAINING), ids=name)
def test_default_experiment_name_is_the_script_name(module):
    assert module.Args().exp_name == name(module)  # the default --run-name starts with it


def test_help_names_the_experiment_flag(capsys):
    """--help as tyro prints it for `python rebel.py --help` (in this process: the same parser, no start-up)."""
    with pytest.raises(SystemExit) as done:
        tyro.cli(rebel.Args, args=["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--exp-name" in out and "runs/<run-name>" in out and "--run-name" in out
