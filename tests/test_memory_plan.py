"""bench/memory_plan.py: exact parameter counts, hand-computed memory terms, and the README recipes it plans.

No GPU and no download: the models are configs instantiated on the meta device. Whether the README's own recipes fit
is not asserted (their flags are changing); a recipe's argv with the sharding flags set is checked instead."""

import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory_plan as mp  # noqa: E402
import test_readme  # noqa: E402

GIB = 2 ** 30
LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
PYTHIA_1B = "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"


@pytest.fixture(scope="module")
def readme_plan():
    notes = []
    return mp.plan_readme(notes), notes


def readme_args(script: str, model_part: str, **overrides):
    """The args of the README's torchrun command running `script` on a model whose id contains model_part."""
    for command in test_readme.readme_commands():
        if command.launcher == "torchrun" and command.script == script and model_part in " ".join(command.argv):
            return command.nproc, mp.script_args(script, command.argv, **overrides)
    pytest.fail(f"no README torchrun command runs {script} on {model_part}")


def test_parameter_counts():
    # GPT-NeoX by hand (Pythia-1B: untied embed_out, biases everywhere, two LayerNorms a layer, a final one)
    v, h, i, layers = 50304, 2048, 8192, 16
    layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
    assert mp.num_params(PYTHIA_1B) == layers * layer + 2 * v * h + 2 * h == 1_011_781_632
    assert mp.num_params("EleutherAI/pythia-1b-deduped") == 1_011_781_632  # the same model under another id
    assert mp.num_params("vwxyzjn/EleutherAI_pythia-2.8b-deduped__sft__tldr") == 2_775_208_960  # Pythia paper
    assert mp.num_params(LLAMA) == 8_030_261_248
    assert mp.num_params(LLAMA, True) == 8_030_261_248 - 128256 * 4096 + 4096  # LM head -> one-label score head
    with pytest.raises(mp.UnknownModel):
        mp.num_params("someone/unknown-7b")


def test_hand_computed_terms():
    n = 8_030_261_248
    assert mp.trained_bytes(n, 8, fsdp=True) == 16 * n / 8  # fp32 weights, grads, AdamW's two moments, sharded
    assert mp.trained_bytes(n, 8, fsdp=False) == 20 * n  # the same on every GPU, plus DDP's gradient buckets
    llama = mp.model_config(LLAMA)
    assert mp.kv_bytes(llama, 1, 1) == 2 * 32 * 8 * 128 * 2 == 131072  # K and V, 32 layers, 8 kv heads of 128
    assert mp.kv_bytes(llama, 64, 2048) == 16 * GIB
    # activations per token and sequence: layers x (18 h + 4 I) for GELU, (18 h + 8 I) for SwiGLU
    assert mp.activation_bytes(mp.model_config(PYTHIA_1B), 1, 1, False) == 16 * (18 * 2048 + 4 * 8192)
    assert mp.activation_bytes(llama, 1, 1, False) == 32 * (18 * 4096 + 8 * 14336)
    assert mp.activation_bytes(llama, 2, 2048, True) == 32 * 2 * 2048 * 2 * 4096 + 2 * 2048 * (18 * 4096 + 8 * 14336)
    assert mp.logit_bytes(llama, 2, 1024) == 2 * 1025 * 128256 * 4


def test_readme_recipes_planned(readme_plan):
    rows, notes = readme_plan
    assert not [note for note in notes if "not in CONFIGS" in note or "rejects" in note], notes
    rl = [c for c in test_readme.readme_commands() if c.launcher == "torchrun" and c.script in
          mp.PPO_FAMILY | mp.PAIRED]
    assert len(rows) == len(rl) >= 10  # every torchrun RL recipe, the pipeline's runs/tldr/... ones included
    found = {(r.script, r.models.split(" + ")[0]) for r in rows}
    assert {("rebel.py", "8.0"), ("refuel.py", "8.0"), ("rebel.py", "2.8"), ("ppo.py", "1.0"), ("ppo_plus.py", "1.0"),
            ("drpo.py", "1.0")} <= found
    pipeline = [r for r in rows if r.script == "ppo.py" and r.models == "2.8 + 2.6"]
    assert pipeline, "runs/tldr/sft and runs/tldr/reward should resolve to Pythia-2.8B (the SFT command's --model)"
    for r in rows:  # every component is there and the peak is at least what stays resident
        assert r.peak >= r.parts["trained"] + r.parts["frozen"] > 0 and r.ddp_peak >= r.peak - 1


def test_rebel_8b_needs_fsdp():
    world, args = readme_args("rebel.py", "Llama-3-8B", fsdp=True, gradient_checkpointing=True,
                              generation_batch_size=64)
    row = mp.plan("rebel.py", world, args)
    assert world == 8 and row.sizes == {"G": 64, "S": 2, "T": 2048}
    assert row.parts["KV"] == 16 * GIB and row.parts["copy"] == 2 * 8_030_261_248  # the gathered bf16 policy
    assert row.peak <= 76 * GIB < row.ddp_peak
    ddp = mp.plan("rebel.py", world, mp.SimpleNamespace(**{**vars(args), "fsdp": False}))
    assert ddp.peak == row.ddp_peak > 2 * 76 * GIB  # 20 B/param of the policy alone is 150 GiB


def test_refuel_8b_needs_gradient_checkpointing():
    """REFUEL's 5120-token queries: sharded, it fits with checkpointing, but not with every layer's activations."""
    world, args = readme_args("refuel.py", "Llama-3-8B", fsdp=True, gradient_checkpointing=True,
                              generation_batch_size=64)
    row = mp.plan("refuel.py", world, args)
    assert row.sizes == {"G": 32, "S": 2, "T": 5120}  # G: no more than the local batch of 2 x 128 / 8 dialogues
    assert row.parts["frozen"] == 2 * 7_504_928_768 / 8 + 2 * 8_030_261_248  # no reference; RM sharded, user not
    assert row.peak <= 76 * GIB
    args.gradient_checkpointing = False
    assert mp.plan("refuel.py", world, args).peak > 76 * GIB


def test_main_prints_and_gates(capsys):
    assert mp.main(["--gpu-gib", "100000"]) == 0
    out = capsys.readouterr().out
    assert "| line | script |" in out and "DDP peak" in out and "rebel.py" in out
    assert mp.main(["--gpu-gib", "1"]) == 1


def test_every_readme_recipe_fits_an_80gb_gpu(readme_plan):
    """The README's multi-GPU recipes fit 76 GiB per GPU by the plan (80 GB cards, a reserve for CUDA and NCCL)."""
    rows, _ = readme_plan
    too_big = [(r.line, r.script, round(r.peak / 2 ** 30, 1)) for r in rows if r.peak > 76 * 2 ** 30]
    assert not too_big


def test_readme_shows_the_plan_as_the_script_prints_it(capsys):
    """The table in README.md is `python bench/memory_plan.py`'s output for the README as it is (recipes and their
    line numbers): after changing a recipe, paste the new output over the old table."""
    mp.main([])
    printed = capsys.readouterr().out.strip()
    assert printed in open(os.path.join(ROOT, "README.md")).read()
