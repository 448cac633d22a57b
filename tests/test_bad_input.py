"""Bad input stops every script within seconds with one `error: ...` line naming the flag, column or function at
fault, before it trains, and leaves no half-written model behind (an earlier model in --output-dir stays as it was);
and too few evaluation rows for the processes is not bad input at all.

Most cases call `module.main(module.Args(...))` in this process (cheap) under a deadline, so a hang fails the test
instead of stalling the suite; a few run the command line to see the exact stderr."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import dpo
import drpo
import evaluate
import ppo
import ppo_plus
import rebel
import refuel
import reward
import sft
from conftest import ENV, REWARDS, ROOT, free_port, write_prompts

FRACTION_OF_A = f"{REWARDS}:fraction_of_a"
TRAINING = [rebel, ppo, ppo_plus, drpo, refuel, sft, dpo, reward]
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl")
FAKE_MODEL = {"config.json": b'{"fake": "a model saved by an earlier run"}\n', "model.safetensors": b"earlier weights",
              "metrics.jsonl": b'{"step": 1, "loss": 0.5}\n'}  # the earlier run's metrics survive too

# What a user might put in a file passed as --reward-fn, --user-fn or --judge-fn (line numbers matter: see `line_of`).
USER_FUNCTIONS = '''\
def one(prompts, completions, **kwargs):
    return [1.0]


def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def inf(prompts, completions, **kwargs):
    return [0.0] + [float("inf")] * (len(completions) - 1)


def boom(prompts, completions, **kwargs):
    raise ValueError("bad row")  # boom raises here


def boom_user(conversations):
    raise ValueError("bad row")  # boom_user raises here
'''


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def user_fns(tmp_path) -> str:
    path = tmp_path / "user_fns.py"
    path.write_text(USER_FUNCTIONS)
    return str(path)


def line_of(text: str) -> int:
    """1-based line of `text` in USER_FUNCTIONS."""
    return next(i for i, line in enumerate(USER_FUNCTIONS.splitlines(), 1) if text in line)


def write_pairs(path, n: int) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Count: {i}", "chosen": f" {i + 1}", "rejected": f" {i + 2}"}) + "\n")
    return str(path)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging: the old code looped forever on a too-small dataset."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main_error(module, seconds: int = 60, **kwargs) -> SystemExit:
    """Run module.main in this process; it must stop with SystemExit('error: <one line>') within `seconds`."""
    with deadline(seconds), pytest.raises(SystemExit) as error:
        module.main(module.Args(**kwargs))
    message = error.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return error.value


def cli_error(script: str, *flags, timeout: int = 60) -> str:
    """Run `python script flags...`: it must exit != 0 with an `error: ` last stderr line and no traceback."""
    result = subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout[-2000:]
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


def fake_earlier_model(out) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, content in FAKE_MODEL.items():
        (out / name).write_bytes(content)


def assert_nothing_saved(out, earlier: bool = False) -> None:
    """No model files in `out` (none at all, or exactly the earlier run's, byte for byte); no temporary folder."""
    if not out.exists():
        assert not earlier
        return
    for name in MODEL_FILES:
        path = out / name
        if earlier and name in FAKE_MODEL:
            assert path.read_bytes() == FAKE_MODEL[name], name
        else:
            assert not path.exists(), name
    assert not [p for p in out.iterdir() if p.is_dir()], list(out.iterdir())  # no half-moved temporary folder


def tiny_rebel(model: str, dataset: str, out, **kwargs) -> dict:
    """rebel.Args for one short iteration on the tiny model (4 held-out prompts, 4 prompts per batch)."""
    return dict(model=model, dataset=dataset, output_dir=str(out), num_iterations=1, batch_size=4, num_passes=1,
                num_minibatches=1, max_new_tokens=4, num_eval_prompts=4, micro_batch_size=8) | kwargs


# ----------------------------------------------------------------------------------------------------------------
# 1. fewer training rows than --batch-size (the old code sampled batches forever)
# ----------------------------------------------------------------------------------------------------------------
def test_rebel_cli_dataset_smaller_than_batch_size(tiny_llama, tmp_path):
    data, out = write_prompts(tmp_path / "five.jsonl", 5), tmp_path / "out"
    line = cli_error("rebel.py", "--model", tiny_llama, "--dataset", data, "--reward-fn", FRACTION_OF_A,
                     "--batch-size", "16", "--output-dir", str(out))
    assert "--batch-size 16" in line and "5 training rows" in line, line
    assert_nothing_saved(out)


def test_ppo_dataset_smaller_than_batch_size(tiny_llama, tmp_path):
    data, out = write_prompts(tmp_path / "five.jsonl", 5), tmp_path / "out"
    error = main_error(ppo, model=tiny_llama, dataset=data, reward_fn=FRACTION_OF_A, batch_size=16,
                       output_dir=str(out))
    assert "--batch-size 16" in error.code and "5 training rows" in error.code, error.code
    assert_nothing_saved(out)


# ----------------------------------------------------------------------------------------------------------------
# 2.-4. rewards that cannot be trained on: a wrong count, NaN or inf from a function, NaN from a reward model
# ----------------------------------------------------------------------------------------------------------------
def test_reward_fn_returning_the_wrong_count(tiny_llama, tmp_path, user_fns):
    out = tmp_path / "out"
    spec = f"{user_fns}:one"
    error = main_error(rebel, **tiny_rebel(tiny_llama, write_prompts(tmp_path / "p.jsonl", 40), out, reward_fn=spec))
    assert f"--reward-fn {spec}" in error.code and "returned 1 rewards for 4 responses" in error.code, error.code
    assert_nothing_saved(out)


@pytest.mark.parametrize("name, shown", [("nan", "returned nan for response 0"),
                                         ("inf", "returned inf for response 1")])
def test_reward_fn_returning_nan_or_inf_keeps_the_last_good_model(name, shown, tiny_llama, tmp_path, user_fns):
    out = tmp_path / "out"
    fake_earlier_model(out)
    spec = f"{user_fns}:{name}"
    error = main_error(rebel, **tiny_rebel(tiny_llama, write_prompts(tmp_path / "p.jsonl", 40), out, reward_fn=spec))
    assert f"--reward-fn {spec}" in error.code and shown in error.code, error.code
    assert_nothing_saved(out, earlier=True)


def test_reward_model_scoring_nan(tiny_llama, tiny_reward_model, tmp_path):
    broken = tmp_path / "nan_rm"
    shutil.copytree(tiny_reward_model, broken)
    model = AutoModelForSequenceClassification.from_pretrained(broken)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    out = tmp_path / "out"
    fake_earlier_model(out)
    error = main_error(rebel, **tiny_rebel(tiny_llama, write_prompts(tmp_path / "p.jsonl", 40), out,
                                           reward_model=str(broken)))
    assert f"--reward-model {broken}" in error.code and "returned nan" in error.code, error.code
    assert_nothing_saved(out, earlier=True)


# ----------------------------------------------------------------------------------------------------------------
# 5. a NaN loss
# ----------------------------------------------------------------------------------------------------------------
def test_nan_loss_stops_without_saving(tiny_llama, tmp_path, monkeypatch):
    real = rebel.rebel_loss
    monkeypatch.setattr(rebel, "rebel_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "out"
    fake_earlier_model(out)
    error = main_error(rebel, **tiny_rebel(tiny_llama, write_prompts(tmp_path / "p.jsonl", 40), out,
                                           reward_fn=FRACTION_OF_A))
    assert "the loss is nan" in error.code, error.code
    assert_nothing_saved(out, earlier=True)


@pytest.mark.parametrize("module, loss_fn", [(sft, "sft_loss"), (dpo, "pair_stats"), (reward, "pairwise_loss")],
                         ids=lambda x: getattr(x, "__name__", x))
def test_nan_loss_stops_sft_dpo_and_reward_without_saving(module, loss_fn, tiny_llama, tiny_gpt2, tmp_path,
                                                          monkeypatch):
    real = getattr(module, loss_fn)
    monkeypatch.setattr(module, loss_fn, lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "out"
    fake_earlier_model(out)
    data = write_prompts(tmp_path / "p.jsonl", 40) if module is sft else write_pairs(tmp_path / "p.jsonl", 40)
    flags = dict(num_epochs=0.1, batch_size=4, log_every=100) | ({"num_eval_prompts": 4} if module is sft else
                                                                 {"num_eval_pairs": 4})
    flags |= {"reward_fn": None} if module is not reward else {}
    error = main_error(module, model=tiny_gpt2 if module is reward else tiny_llama, dataset=data, output_dir=str(out),
                       **flags)
    assert "loss is nan" in error.code, error.code
    assert_nothing_saved(out, earlier=True)


# ----------------------------------------------------------------------------------------------------------------
# 6. the default (embedded-task) reward on another dataset; 7. an --output-dir that cannot be written
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [rebel, ppo, refuel], ids=lambda m: m.__name__)
def test_default_reward_on_another_dataset_needs_a_reward(module, tmp_path):
    out = tmp_path / "out"
    error = main_error(module, model=str(tmp_path / "no-such-model"), dataset=write_prompts(tmp_path / "p.jsonl", 40),
                       output_dir=str(out))
    assert error.code.startswith(f"error: --reward-fn {module.Args.reward_fn} scores only the embedded task"), \
        error.code
    assert "give --reward-model or --reward-fn" in error.code
    assert not out.exists()


@pytest.mark.parametrize("module", [rebel, ppo, sft, dpo, reward, refuel, evaluate], ids=lambda m: m.__name__)
def test_output_dir_that_cannot_be_written(module, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, not a folder\n")
    out = blocker / "out"
    missing = str(tmp_path / "no-such-model")
    models = dict(policy=[missing], reference=missing) if module is evaluate else dict(model=missing)
    error = main_error(module, output_dir=str(out), **models)
    assert error.code.startswith(f"error: --output-dir {out}: cannot write there"), error.code
    assert blocker.read_text() == "a regular file, not a folder\n"


# ----------------------------------------------------------------------------------------------------------------
# 8. an exception inside a user's function: one line naming the flag, the error and where it was raised
# ----------------------------------------------------------------------------------------------------------------
def assert_names_the_raise(error: SystemExit, flag: str, spec: str, function: str):
    """One line: the flag and its value, the exception's type and message, the file and line that raised it; the
    exception itself (with its traceback) stays attached as the cause."""
    assert error.code == \
        f"error: {flag} {spec} raised ValueError: bad row (at user_fns.py:{line_of(f'# {function} raises here')})"
    assert isinstance(error.__cause__, ValueError) and str(error.__cause__) == "bad row"


def test_reward_fn_that_raises(tiny_llama, tmp_path, user_fns):
    out, spec = tmp_path / "out", f"{user_fns}:boom"
    fake_earlier_model(out)
    error = main_error(rebel, **tiny_rebel(tiny_llama, write_prompts(tmp_path / "p.jsonl", 40), out, reward_fn=spec))
    assert_names_the_raise(error, "--reward-fn", spec, "boom")
    assert_nothing_saved(out, earlier=True)


def test_refuel_user_fn_that_raises(tiny_llama, tmp_path, user_fns):
    out, spec = tmp_path / "out", f"{user_fns}:boom_user"
    error = main_error(refuel, model=tiny_llama, dataset=write_prompts(tmp_path / "p.jsonl", 40), user_fn=spec,
                       reward_fn=f"{REWARDS}:dialogue_fraction_of_a", output_dir=str(out), max_turns=2,
                       num_iterations=1, batch_size=2, num_passes=1, num_minibatches=1, grad_accum_steps=1,
                       num_eval_prompts=2, max_new_tokens=4, micro_batch_size=8)
    assert_names_the_raise(error, "--user-fn", spec, "boom_user")
    assert_nothing_saved(out)


def test_evaluate_judge_fn_that_raises(tiny_llama, tmp_path, user_fns):
    out, spec = tmp_path / "out", f"{user_fns}:boom"
    error = main_error(evaluate, policy=[tiny_llama], reference=tiny_llama, judge_fn=spec, reward_fn=FRACTION_OF_A,
                       dataset=write_prompts(tmp_path / "p.jsonl", 40), num_prompts=2, max_new_tokens=4,
                       output_dir=str(out))
    assert_names_the_raise(error, "--judge-fn", spec, "boom")
    assert not out.exists()  # no eval.json or samples.jsonl from a run that did not finish


def test_cli_reward_fn_that_raises_prints_one_line(tiny_llama, tmp_path, user_fns):
    """The same from the command line: the chained traceback is not printed."""
    out, spec = tmp_path / "out", f"{user_fns}:boom"
    flags = tiny_rebel(tiny_llama, write_prompts(tmp_path / "p.jsonl", 40), out, reward_fn=spec)
    line = cli_error("rebel.py", *[x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))])
    assert line == f"error: --reward-fn {spec} raised ValueError: bad row (at user_fns.py:{line_of('# boom raises')})"
    assert_nothing_saved(out)


# ----------------------------------------------------------------------------------------------------------------
# 9. a learning rate that is not positive, a warm-up ratio outside [0, 1)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr", [0.0, -1.0])
@pytest.mark.parametrize("module", TRAINING, ids=lambda m: m.__name__)
def test_lr_must_be_positive(module, lr):
    with pytest.raises(SystemExit) as error:
        module.check_args(module.Args(lr=lr), 1)
    assert error.value.code == f"error: --lr must be positive, got {lr}"


@pytest.mark.parametrize("module", TRAINING, ids=lambda m: m.__name__)
def test_warmup_ratio_must_be_below_one(module):
    with pytest.raises(SystemExit) as error:
        module.check_args(module.Args(warmup_ratio=1.5), 1)
    assert error.value.code == "error: --warmup-ratio must be in [0, 1), got 1.5"


# ----------------------------------------------------------------------------------------------------------------
# 10. fewer evaluation rows than processes: a rank with no evaluation rows still takes part (the old code's
#     common.shard raised IndexError on it)
# ----------------------------------------------------------------------------------------------------------------
# (DDP with an empty rank: test_resume.py's two-process runs evaluate one prompt on two processes)
@pytest.mark.parametrize("script,sharding", [("sft.py", ["--fsdp"]),
                                             ("dpo.py", ["--fsdp", "--gradient-checkpointing"]),
                                             ("reward.py", ["--fsdp", "--gradient-checkpointing"])])
def test_one_eval_row_on_two_processes(script, sharding, tiny_llama, tmp_path):
    """One rank evaluates nothing: under DDP it must still take part; under FSDP2 the other rank's forwards are
    collectives, so the empty rank must gather the model too (rebel.py: test_resume.py's two-process runs)."""
    out = tmp_path / "out"
    if script in ("dpo.py", "reward.py"):
        data, flags = write_pairs(tmp_path / "pairs.jsonl", 20), ["--num-eval-pairs", "1"]
    else:
        data, flags = write_prompts(tmp_path / "p.jsonl", 20), ["--num-eval-prompts", "1"]
    if script != "reward.py":
        flags += ["--reward-fn", FRACTION_OF_A, "--max-new-tokens", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
           script, "--model", tiny_llama, "--dataset", data, "--batch-size", "2", "--output-dir", str(out), *flags,
           *sharding]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
