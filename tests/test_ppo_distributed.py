"""A 2-process gloo run of ppo.py's update, under DDP and under FSDP2, equals the 1-process run on the same global
batch.

Rollouts cannot be identical across world sizes (each rank samples from its own RNG), so the worker
(tests/ppo_dist_worker.py) builds one fixed global rollout on every rank, keeps its rank's rows, whitens advantages
over the global batch and runs ppo.update (2 epochs, gradient accumulation over 2 micro-batches, no_sync on the
first). One minibatch per epoch: with several, each rank draws its own split into minibatches."""

import os
import subprocess
import sys

import torch
from transformers import AutoModelForSequenceClassification

import common
from conftest import CPU, ENV, ROOT, free_port

WORKER = os.path.join(ROOT, "tests", "ppo_dist_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
import ppo_dist_worker  # noqa: E402


def run(cmd):
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_processes_ddp_and_fsdp2_match_one(tiny_llama, tmp_path):
    ppo_dist_worker.main(tiny_llama, str(tmp_path / "one"))  # one process: this one
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
         WORKER, tiny_llama, str(tmp_path / "two")])
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]

    # advantages and returns: each rank's rows equal the single process's rows (whitening saw the global batch)
    for r, out in enumerate(ranks):
        for key in ("advantages", "returns"):
            torch.testing.assert_close(out[key], one[key][r::2], atol=1e-6, rtol=0)

    # parameters: both ranks identical, and equal to the single process's
    initial = common.load_model(tiny_llama, CPU).state_dict()
    value = common.load_model(tiny_llama, CPU, cls=AutoModelForSequenceClassification, num_labels=1)
    initial = {f"policy.{k}": v for k, v in initial.items()} | {f"value.{k}": v for k, v in value.state_dict().items()}
    moved = 0.0
    for name, p in one["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], p, atol=1e-5, rtol=0, msg=name)
        if name in initial and not name.startswith("value.score"):
            moved = max(moved, (p - initial[name]).abs().max().item())
    assert moved > 1e-3  # the update did change the weights, so the 1e-5 agreement is not vacuous
    assert any(k.startswith("value.model") for k in one["params"])  # the value backbone was trained as well

    # The same update with policy and value model sharded by FSDP2 (and gradient checkpointing): equal to 1e-5, as
    # the reduce-scatter averages gradients over ranks as DDP's all-reduce does.
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
         WORKER, tiny_llama, str(tmp_path / "fsdp"), "fsdp"])
    for r in range(2):
        out = torch.load(tmp_path / "fsdp" / f"rank{r}.pt")
        assert out["params"].keys() == one["params"].keys()
        for name, p in one["params"].items():
            torch.testing.assert_close(out["params"][name], p, atol=1e-5, rtol=0, msg=name)

