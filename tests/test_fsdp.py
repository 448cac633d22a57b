"""FSDP2 (`--fsdp`) on CPU under gloo, 2 processes: rollouts and evaluations whose ranks take different branches
finish and give one process's numbers; a tied-embedding model saved from its shards loads back unchanged.

The update itself under FSDP2 (equal to one process, state sharded 1/world, saved weights identical) is tested
beside the DDP one: test_rebel.py and test_ppo_distributed.py."""

import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import common
import refuel
from conftest import CPU, ENV, REWARDS, ROOT, free_port

WORKER = os.path.join(ROOT, "tests", "fsdp_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
from fsdp_worker import PROMPTS  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tiny_gpt2, tiny_llama, tiny_reward_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
           WORKER, tiny_gpt2, tiny_llama, tiny_reward_model, str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], out


def test_ppo_plus_rollout_and_uneven_evaluation_under_fsdp(ranks, tiny_gpt2, tiny_reward_model):
    results, out = ranks
    # rank 0 rolled in pi_ref on every prompt (a reset of at least one token unless the guide ended at once), rank 1
    # on none: rank 1 called generate on the reference with no rows while rank 0 sampled four.
    assert (results[0]["ppo_plus"]["prefix_length"] > 0).sum() >= 3
    assert (results[1]["ppo_plus"]["prefix_length"] == 0).all()
    # The evaluation of 3 prompts split 2 / 1 over the ranks equals one process's, on both ranks.
    tokenizer = common.load_tokenizer(tiny_gpt2)
    rows = common.tokenize_prompts(Dataset.from_dict({"prompt": PROMPTS[:3]}), tokenizer, 64)
    score = common.make_scorer(tiny_reward_model, None, CPU, torch.float32)
    one = common.score_held_out(common.load_model(tiny_gpt2, CPU), tokenizer, rows, score, 6, 0.0, 2, CPU)
    assert one["score"] != 0
    for result in results:
        assert result["ppo_plus"]["evaluation"] == pytest.approx(one, rel=1e-5)
    # The tied-embedding policy saved from its shards loads back with every weight unchanged.
    saved = AutoModelForCausalLM.from_pretrained(out / "policy")
    original = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert saved.lm_head.weight.data_ptr() == saved.transformer.wte.weight.data_ptr()  # still tied
    for (name, a), b in zip(original.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name


def test_refuel_rollout_with_different_horizons_and_uneven_evaluation_under_fsdp(ranks, tiny_llama):
    results, _ = ranks
    assert set(results[0]["refuel"]["horizons"]) == {1} and max(results[1]["refuel"]["horizons"]) > 1
    assert torch.equal(results[0]["refuel"]["kl"], torch.zeros(4))  # the sharded reference equals the policy
    # Dialogues split 2 / 1 over the ranks: per-turn means equal one process's over the 3 dialogues.
    args = refuel.Args(model=tiny_llama, max_turns=3, max_new_tokens=6, user_fn=f"{REWARDS}:echo_user",
                       reward_fn=f"{REWARDS}:dialogue_length")
    user, score = refuel.make_user(args, CPU, torch.float32), refuel.make_scorer(args, CPU, torch.float32)
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS[:3]]
    one = refuel.evaluate_turns(common.load_model(tiny_llama, CPU), common.load_tokenizer(tiny_llama), user, score,
                                rows, args, common.precision("float32", CPU)[1])
    assert min(one) > 0
    for result in results:
        assert result["refuel"]["turns"] == pytest.approx(one, rel=1e-5)
