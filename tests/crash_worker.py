"""Run by test_resume.py: a training script's main(), which kills itself (SIGKILL) in the middle of writing
checkpoint-<STEP>, after torch.distributed.checkpoint wrote the weights and AdamW state into its .tmp folder and
before the checkpoint is complete, as a crash or a preemption during a save would.

usage: python tests/crash_worker.py SCRIPT STEP [the script's flags]"""

import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tyro  # noqa: E402

import common  # noqa: E402

script, step, *argv = sys.argv[1:]
save = common.dcp.save


def save_then_die(state, checkpoint_id):
    save(state, checkpoint_id=checkpoint_id)
    if checkpoint_id.endswith(f"checkpoint-{step}.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)


common.dcp.save = save_then_die
module = importlib.import_module(script)
module.main(tyro.cli(module.Args, args=argv))
