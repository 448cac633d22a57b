"""--save-every / --resume: a run killed part-way (SIGKILL, also in the middle of writing a checkpoint) and resumed
ends bit for bit where the uninterrupted run ends: weights, AdamW state, metrics.jsonl. REBEL, PPO and REFUEL in one
process, REBEL and PPO in two; a resume with other flags stops with one line naming them."""

import importlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import tyro
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import rebel
from conftest import ENV, REWARDS, ROOT, free_port, read_jsonl, write_prompts


def flags(script: str, model: str, data: str, out) -> list[str]:
    """4 iterations of a tiny run, a checkpoint after each."""
    shared = ["--model", model, "--dataset", data, "--num-iterations", "4", "--save-every", "1", "--seed", "1",
              "--max-new-tokens", "6", "--lr", "3e-3", "--output-dir", str(out)]
    if script == "refuel":
        return shared + ["--user-fn", f"{REWARDS}:echo_user", "--reward-fn", f"{REWARDS}:dialogue_length",
                         "--batch-size", "4", "--max-turns", "2", "--num-eval-prompts", "2"]
    # (one evaluation prompt: on two processes one rank evaluates nothing, which must not stall the other)
    return shared + ["--reward-fn", f"{REWARDS}:fraction_of_digits", "--batch-size", "8", "--num-eval-prompts", "1"]


def launch(script: str, argv: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, f"{script}.py", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port",
            str(free_port()), f"{script}.py", *argv]


def run(cmd: list[str]):
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def run_here(script: str, argv: list[str]):
    """The script's main() in this process, on one thread as the subprocesses run (ENV: OMP_NUM_THREADS=1), so that
    its floating-point results are the same bits (and without a subprocess's start-up time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = importlib.import_module(script)
        module.main(tyro.cli(module.Args, args=argv))
    finally:
        torch.set_num_threads(threads)


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun's workers and theirs), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    below = [child for child, parent in parents.items() if parent == pid]
    return below + [d for child in below for d in descendants(child)]


def kill_after(cmd: list[str], out, step: int):
    """Start the run and SIGKILL it, every process of it, as soon as its checkpoint-<step> is complete."""
    process = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / f"checkpoint-{step}").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in descendants(process.pid) + [process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    time.sleep(0.5)
    assert not (out / "model.safetensors").exists()  # killed before the end


def assert_same_run(a, b, tmp_path):
    """Same metrics lines, same final weights, same AdamW state in the last checkpoint."""
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    states = []
    for run_dir in (a, b):
        dcp_to_torch_save(run_dir / "checkpoint-4", tmp_path / f"{run_dir.name}.pt")
        states.append(torch.load(tmp_path / f"{run_dir.name}.pt", weights_only=False)["optimizer"]["state"])
    assert states[0].keys() == states[1].keys() and states[0]
    for key in states[0]:
        for name, value in states[0][key].items():
            assert torch.equal(value, states[1][key][name]), (key, name)


@pytest.mark.parametrize("script", ["ppo", "refuel"])
def test_killed_after_the_second_iteration_and_resumed(script, tiny_llama, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_here(script, flags(script, tiny_llama, data, full))
    kill_after(launch(script, flags(script, tiny_llama, data, resumed), 1), resumed, 2)
    run_here(script, flags(script, tiny_llama, data, resumed) + ["--resume"])
    assert_same_run(full, resumed, tmp_path)


def test_rebel_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_llama, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_here("rebel", flags("rebel", tiny_llama, data, full))
    crash = [sys.executable, os.path.join(ROOT, "tests", "crash_worker.py"), "rebel", "3",
             *flags("rebel", tiny_llama, data, resumed)]
    assert subprocess.run(crash, cwd=ROOT, env=ENV, capture_output=True, timeout=300).returncode == -signal.SIGKILL
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3.tmp"]
    run_here("rebel", flags("rebel", tiny_llama, data, resumed) + ["--resume"])
    assert_same_run(full, resumed, tmp_path)
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4"]  # --keep-checkpoints 1


@pytest.mark.parametrize("script", ["rebel", "ppo"])
def test_two_processes_resume_every_rank(script, tiny_llama, tmp_path):
    """On two processes (one evaluation prompt, so one rank evaluates nothing) a run resumed from its checkpoint-2
    ends as the uninterrupted run: every rank's shards and random states come back. The resumed folder starts as a
    killed run leaves it (checkpoint-2, metrics.jsonl logged past it); the kill itself, and a kill while writing, are
    the one-process tests above (what a kill leaves does not depend on the process count). REFUEL resumes through
    the same calls (its one-process test above)."""
    data = write_prompts(tmp_path / "p.jsonl")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(launch(script, flags(script, tiny_llama, data, full) + ["--keep-checkpoints", "4"], 2))
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    run(launch(script, flags(script, tiny_llama, data, resumed) + ["--resume"], 2))
    assert_same_run(full, resumed, tmp_path)


def test_a_resume_with_other_flags_stops_naming_them(tiny_llama, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl")
    resumed = tmp_path / "resumed"
    run_here("rebel", flags("rebel", tiny_llama, data, resumed))
    # A resume with flags that change the run stops before loading anything, naming them.
    args = tyro.cli(rebel.Args, args=flags("rebel", tiny_llama, data, resumed) + ["--resume", "--batch-size", "16"])
    with pytest.raises(SystemExit) as error:
        rebel.check_args(args, 1)
    assert "--batch-size 16 (the checkpoint's: 8)" in str(error.value) and "\n" not in str(error.value)
