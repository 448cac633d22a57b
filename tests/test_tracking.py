"""Runs people can find again: a run name and its own folder, args.json, a model card, and the trackers
(tensorboard, trackio, wandb offline) holding exactly what metrics.jsonl holds."""

import json
import os
import sys
import time

import pytest

import rebel
from conftest import REWARDS, read_jsonl, write_prompts

REWARD = f"{REWARDS}:fraction_of_digits"


def tiny_run(model: str, data: str, **flags) -> rebel.Args:
    """A 2-iteration REBEL run with the default run name and --output-dir (runs/<run name> under the cwd)."""
    args = rebel.Args(model=model, dataset=data, reward_fn=REWARD, num_iterations=2, batch_size=4,
                      max_new_tokens=4, num_eval_prompts=2, **flags)
    rebel.main(args)
    return args


def test_runs_land_in_their_own_folders_with_args_json_and_a_model_card(tiny_llama, tmp_path, monkeypatch):
    data = write_prompts(tmp_path / "p.jsonl")
    monkeypatch.chdir(tmp_path)
    first, second = tiny_run(tiny_llama, data, lr=1e-3), tiny_run(tiny_llama, data, lr=1e-3)
    assert first.run_name.startswith("rebel__1__") and first.output_dir == os.path.join("runs", first.run_name)
    assert first.output_dir != second.output_dir and sorted(os.listdir("runs")) == sorted(
        [first.run_name, second.run_name])  # the same flags, a second later: another folder
    saved = json.load(open(os.path.join(first.output_dir, "args.json")))
    assert rebel.Args(**saved["flags"]) == first  # every flag round-trips
    assert saved["world_size"] == 1 and saved["device"] == "cpu" and saved["torch"] and saved["transformers"]
    card = open(os.path.join(first.output_dir, "README.md")).read()
    after = read_jsonl(os.path.join(first.output_dir, "metrics.jsonl"))[-1]
    assert f"from `{tiny_llama}` on `{data}`, reward: `{REWARD}`" in card and "`rebel.py`" in card
    assert f"| score | {after['eval_score_before']:.4g} | {after['eval_score_after']:.4g} |" in card
    assert '"lr": 0.001' in card


def test_tensorboard_holds_the_metrics(tiny_llama, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    args = tiny_run(tiny_llama, write_prompts(tmp_path / "p.jsonl"), report_to="tensorboard")
    events = EventAccumulator(args.output_dir)
    events.Reload()
    for row in read_jsonl(os.path.join(args.output_dir, "metrics.jsonl")):
        for key, value in row.items():
            if key != "step":
                logged = {e.step: e.value for e in events.Scalars(key)}
                assert logged[row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_trackio_holds_the_metrics(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # its local store, offline
    assert "trackio" not in sys.modules  # it reads TRACKIO_DIR when imported
    monkeypatch.chdir(tmp_path)
    args = tiny_run(tiny_llama, write_prompts(tmp_path / "p.jsonl"), report_to="trackio")
    import trackio

    logged = trackio.SQLiteStorage.get_logs("rebel", args.run_name)  # one row per log call, in order
    rows = read_jsonl(os.path.join(args.output_dir, "metrics.jsonl"))
    assert len(logged) == len(rows) == 3  # 2 iterations and the evaluation
    for tracked, row in zip(logged, rows):
        for key, value in row.items():
            assert tracked[key] == pytest.approx(value), key


def test_wandb_offline_holds_the_metrics(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # not in requirements.txt: runs where wandb is installed
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    args = tiny_run(tiny_llama, write_prompts(tmp_path / "p.jsonl"), report_to="wandb")
    path = next((tmp_path / args.output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(300):  # wandb's service process may still be writing the log after wandb.finish() returns
        log = path.read_bytes()
        if args.run_name.encode() in log and b"eval_score_after" in log:
            break
        time.sleep(0.1)
    assert args.run_name.encode() in log
    for row in read_jsonl(os.path.join(args.output_dir, "metrics.jsonl")):  # each value as wandb's JSON text
        for key, value in row.items():
            if key != "step":
                assert key.encode() in log and json.dumps(value).encode() in log, key
