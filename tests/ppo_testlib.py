"""Helpers of the PPO-family tests (test_ppo.py, test_ppo_plus.py, test_drpo.py): a small prompt/completion
dataset, a reward that records what it scored, one short learning run, and greedy answers from bare prompts.

Also a reward-function file: `--reward-fn tests/ppo_testlib.py:recorded_fraction_of_digits`."""

import json
import os

RECORD_ENV = "PPO_TEST_RECORD"  # file the recording reward appends to


def recorded_fraction_of_digits(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Fraction of the response's characters that are digits (tests/rewards.py:fraction_of_digits), and each
    scored (prompt, response) appended as a JSON line to $PPO_TEST_RECORD, so a test can see what was scored."""
    if os.environ.get(RECORD_ENV):
        with open(os.environ[RECORD_ENV], "a") as f:
            for p, r in zip(prompts, completions):
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in completions]


def write_dataset(path, n: int = 80) -> str:
    """n string prompts with one reference completion each (no digit in it: DR-PO's prefixes don't raise the
    reward by themselves). A local file has one split, so the last rows are the held-out evaluation prompts."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Say {i}:", "completion": "hello world"}) + "\n")
    return str(path)


def learning_run(module, model_dir: str, tmp_path, monkeypatch, **overrides) -> tuple[list[dict], list[dict]]:
    """main(Args(...)) of ppo/ppo_plus/drpo on the tiny model for a few iterations with the digits reward (no EOS
    penalty: a random tiny model almost never ends); returns (metrics.jsonl rows, scored (prompt, response))."""
    record = tmp_path / "scored.jsonl"
    monkeypatch.setenv(RECORD_ENV, str(record))
    settings = dict(model=model_dir, dataset=write_dataset(tmp_path / "data.jsonl"),
                    reward_fn=f"{os.path.abspath(__file__)}:recorded_fraction_of_digits",
                    output_dir=str(tmp_path / "run"),
                    seed=1, num_iterations=10, batch_size=16, num_ppo_epochs=4, num_minibatches=2, lr=1e-2,
                    max_new_tokens=8, num_eval_prompts=8, micro_batch_size=16, eos_penalty=None,
                    eval_temperature=0.0)
    module.main(module.Args(**(settings | overrides)))
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    return metrics, [json.loads(line) for line in open(record)]


def greedy_from_bare_prompts(model_dir: str, dataset: str, num_eval: int, max_new_tokens: int) -> dict:
    """{prompt text: greedy response} of the model at model_dir on the held-out prompts, from the bare prompts."""
    import torch

    import common

    tokenizer = common.load_tokenizer(model_dir)
    _, rows = common.load_splits(dataset, "train", "test", num_eval)
    rows = common.tokenize_prompts(rows, tokenizer, 512)
    query, query_mask = common.left_pad(rows["input_ids"], tokenizer.pad_token_id)
    responses = common.generate(common.load_model(model_dir, torch.device("cpu")), tokenizer, query, query_mask,
                                max_new_tokens, 0.0)
    return dict(zip(rows["prompt_text"], tokenizer.batch_decode(responses, skip_special_tokens=True)))


def check_learning_and_bare_evaluation(module, model_dir, tmp_path, monkeypatch, margin: float = 0.3):
    """The run raises the held-out greedy mean reward by `margin`, and both evaluations scored the greedy answers
    of the start / trained policy from the *bare* prompts (recomputed here independently)."""
    metrics, scored = learning_run(module, model_dir, tmp_path, monkeypatch)
    final = metrics[-1]
    gain = final["eval_score_after"] - final["eval_score_before"]
    assert gain >= margin, f"held-out mean reward {final['eval_score_before']:.3f} -> {final['eval_score_after']:.3f}"
    dataset = str(tmp_path / "data.jsonl")
    before = greedy_from_bare_prompts(model_dir, dataset, 8, 8)
    after = greedy_from_bare_prompts(str(tmp_path / "run"), dataset, 8, 8)
    evaluated = [s for s in scored if s["prompt"] in before]
    assert len(evaluated) == 16  # 8 prompts before and 8 after training; training never samples them
    assert {s["prompt"]: s["response"] for s in evaluated[:8]} == before
    assert {s["prompt"]: s["response"] for s in evaluated[8:]} == after
    return metrics
