"""Shared pieces of the five algorithms: everything two or more scripts need, nothing else.

Read top to bottom, this file is the RLHF plumbing: flag checks, distributed setup and precision, model and tokenizer
loading, data in TRL's formats, sampling, log-probs, the reset draw, rewards, evaluation, logging and saving. The
algorithms live in their own scripts (rebel.py, ppo.py, ...), the offline default model and toy tasks in
embedded.py (imported only for those names); docs/algorithms.md states the facts each helper implements.

Notation: a *query* is a left-padded batch of prompt tokens; a *response* is a right-padded batch of sampled tokens
of fixed width `max_new_tokens`, cut after the first EOS (padding after it).
"""

import atexit
import contextlib
import copy
import functools
import gc
import importlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import traceback
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
from datasets import Dataset, load_dataset
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList, PreTrainedModel, get_scheduler)

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the default --model; works offline through embedded.py
ARITHMETIC = "arithmetic"  # name of the embedded dataset, generated in code by embedded.py
ARITHMETIC_PREFERENCES = "arithmetic-preferences"  # the same questions as chosen (right) / rejected (wrong) pairs
SORTING = "sorting"  # the second embedded task (sort six numbers; long answers, partial credit), from embedded.py
SORTING_PREFERENCES = "sorting-preferences"  # its questions as chosen (sorted) / rejected (wrong) pairs
GENERATION_BACKEND = "auto"  # how `generate` samples unless told otherwise; `setup` sets it from --generation-backend
STATIC_BUCKET = 64  # the static backend left-pads prompts to a multiple of this, so its compiled shapes recur
LOGPROB_CHUNK = 2 ** 24  # logits per chunk of the log-softmax in `logprobs`: 64 MB in float32
# Rows sharing a prompt run it once (`group`) when that saves at least this many tokens of forward: below it, the second
# forward's fixed cost (every weight read once more) outweighs the saving (break-even near 100 tokens on 2 CPU cores).
SHARED_QUERY_MIN_TOKENS = 128
# The keyword (and output field) transformers gives the KV cache: `past_key_values` until 5.2x, `cache` since.
CACHE = "cache" if "cache" in transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__ else \
    "past_key_values"


def fail(message: str):
    """Stop with one clear error line on stderr (exit status 1), before anything heavy has happened."""
    raise SystemExit(f"error: {message}")


def check_flags(args, world_size: int, positive: tuple = (), batch_split: tuple = ()):
    """The flag checks every script shares, one clear error line for the first failure, before anything is loaded:
    each flag in `positive` > 0; --batch-size a multiple of the processes times each flag in `batch_split` (e.g.
    minibatches, then gradient-accumulation micro-batches); and, for whichever of these flags the script has, a
    positive --lr, --num-samples >= 2, a --warmup-ratio in [0, 1), an --output-dir that can be written (checked
    without creating anything), a --report-to package that is installed, and a reward that fits the dataset (the
    default rule reward scores only the embedded task, so any other --dataset needs --reward-model or --reward-fn)."""
    for flag in positive + ("lr",) * hasattr(args, "lr") + ("keep_checkpoints",) * hasattr(args, "keep_checkpoints"):
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if batch_split:
        per_step = world_size
        for flag in batch_split:
            per_step *= getattr(args, flag)
        if args.batch_size <= 0 or args.batch_size % per_step:
            parts = " x ".join([f"processes ({world_size})"] + [f"--{f.replace('_', '-')} ({getattr(args, f)})"
                                                                 for f in batch_split])
            fail(f"--batch-size {args.batch_size} must be a positive multiple of {parts}")
    if getattr(args, "num_samples", 2) < 2:  # rebel.py --mu best-of-n: a best and a worst response
        fail(f"--num-samples must be at least 2 (a best and a worst response), got {args.num_samples}")
    if not 0 <= getattr(args, "warmup_ratio", 0) < 1:
        fail(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if getattr(args, "output_dir", None):  # a writable folder, or a path we can create (nothing is created here)
        existing = os.path.abspath(args.output_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            fail(f"--output-dir {args.output_dir}: cannot write there ({existing} is not a writable folder)")
    if getattr(args, "report_to", "none") != "none" and importlib.util.find_spec(args.report_to) is None:
        fail(f"--report-to {args.report_to}: the package '{args.report_to}' is not installed "
             f"(pip install {args.report_to})")
    if getattr(args, "resume", False):
        check_resume(args)
    fields = getattr(type(args), "__dataclass_fields__", {})
    if {"reward_fn", "reward_model", "dataset"} <= set(fields) and args.reward_model is None and \
            args.reward_fn is not None and args.reward_fn == fields["reward_fn"].default and \
            args.dataset != fields["dataset"].default:
        optional = " (or --reward-fn None: no reward score)" if "None" in str(fields["reward_fn"].type) else ""
        fail(f"--reward-fn {args.reward_fn} scores only the embedded task '{fields['dataset'].default}'; for "
             f"--dataset {args.dataset} give --reward-model or --reward-fn{optional}")


# ---- Distributed setup (torchrun) and seeding ------------------------------------------------------------------
def setup(seed: int, args=None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes in the environment and seed python and torch with seed + rank (ranks
    sample different responses, runs are repeatable); return (rank, world_size, device). With a script's `args`, fill
    in the run's name, --run-name <exp-name>__<seed>__<rank 0's local time, to the ms> (the same on every rank), and
    --output-dir runs/<run name>, so that runs never overwrite each other.

    nccl on GPUs, gloo on CPU. A plain `python script.py` is world size 1 and initialises nothing."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args is not None and args.run_name is None:
        now = time.time()
        stamp = [time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"]
        if dist.is_initialized():
            dist.broadcast_object_list(stamp, src=0)
        args.run_name = f"{args.exp_name}__{seed}__{stamp[0]}"
    if args is not None:
        args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    global GENERATION_BACKEND
    GENERATION_BACKEND = getattr(args, "generation_backend", GENERATION_BACKEND)
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    return rank, world_size, device


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and saves."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce(x: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) of a tensor over ranks; the tensor itself in a single process."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size() if mean else x


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself: FSDP2 wraps nothing)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def transformers_models(module: torch.nn.Module):
    """The outermost transformers models in a module: itself, or those inside a wrapper (PPO's policy + value
    module, a peft LoRA model)."""
    if isinstance(module, PreTrainedModel):
        yield module
        return
    for child in module.children():
        yield from transformers_models(child)


def wrap(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, fsdp: bool = False,
         gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Prepare a model (or a module holding models, like PPO's policy + value) for this run's processes.

    gradient_checkpointing: transformers recomputes each block's activations in the backward pass instead of
    storing them; it acts only in train mode, so the model is put in train mode (dropout is 0: nothing else changes)
    and `generate` samples in eval mode, where the KV cache works. Under torchrun with several processes: with
    fsdp, FSDP2 shards each transformer block and then each whole model over the ranks (parameters, gradients and
    AdamW state: 1/world each), computing in `dtype` and reducing gradients in float32; frozen models are sharded
    the same way. Without fsdp, a model with trained parameters gets DistributedDataParallel (a full copy per rank,
    fastest when it fits); frozen ones stay as they are."""
    models = list(transformers_models(model))
    if gradient_checkpointing:
        for m in models:  # (gradient_checkpointing_enable before transformers 5.2x, deprecated since)
            getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)({"use_reentrant": False})
        model.train()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if fsdp:
        mixed = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
        for m in models:  # each model its own FSDP root: a root's forward must run before its parts are used
            blocks = set(m._no_split_modules or [])  # transformers' names for the transformer-block classes
            for block in [b for b in m.modules() if type(b).__name__ in blocks]:
                fully_shard(block, mp_policy=mixed)
            fully_shard(m, mp_policy=mixed)  # the rest: embeddings (tied or not), final norm, heads
        return model
    if not any(p.requires_grad for p in model.parameters()):
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Under FSDP2, hold the whole model on every rank for the block (one all-gather each, on entry) instead of
    gathering every block at every forward: sampling then makes no collective calls at all, so ranks may call
    `generate` different numbers of times (uneven evaluation shards, PPO++'s roll-ins, REFUEL's dialogues).
    Costs one unsharded copy of the model in its compute dtype. A no-op without FSDP2, when nested, and for None."""
    parts = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)] if model is not None else []
    if not parts or getattr(parts[0], "_held_whole", False):
        yield
        return
    for part in parts:
        part.set_reshard_after_forward(False, recurse=False)
        part.unshard()
        part._held_whole = True
    inner = {id(m) for part in parts for m in list(part.modules())[1:]}
    try:
        yield
    finally:
        for part in parts:  # back to FSDP2's defaults: blocks reshard after forward, roots keep theirs for backward
            part.reshard()
            part.set_reshard_after_forward(id(part) in inner, recurse=False)
            part._held_whole = False


def no_sync_unless(model: torch.nn.Module, sync: bool):
    """Gradient accumulation: skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on the micro-steps
    before the last one of an optimizer step."""
    for part in [m for m in model.modules() if isinstance(m, FSDPModule)]:
        part.set_requires_gradient_sync(sync, recurse=False)
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# ---- Models and tokenizers: a hub id or a local path; the embedded default works offline -----------------------
def precision(name: str, device: torch.device) -> tuple[torch.dtype, functools.partial]:
    """--dtype as (dtype, amp), built once per run. `with amp():` runs the policy and the reference, both float32
    weights, in mixed precision at `dtype` (a fresh autocast context at each use); frozen side models (reward model,
    LLM user, judge) load their weights in `dtype`. 'auto' is bfloat16 on GPU and float32 on CPU."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return dtype, functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)


def resolve_model(name: str) -> str:
    """Where to load `name` from: itself, except the embedded default, which embedded.py makes work offline."""
    if name != EMBEDDED_MODEL or os.path.isdir(name):
        return name
    import embedded

    return embedded.model_dir()


def load_tokenizer(name: str):
    """Tokenizer by hub id or path: pad token falls back to EOS, left padding (queries are left-padded)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32, cls=AutoModelForCausalLM,
               lora=None, **kwargs) -> torch.nn.Module:
    """Model by hub id or path, every dropout probability set to 0 (train-mode dropout breaks log-ratios).

    `cls` picks the head: AutoModelForCausalLM for policies, AutoModelForSequenceClassification (num_labels=1) for
    reward and value models. `lora`, a script's Args: with --lora-r > 0, peft LoRA adapters on
    --lora-target-modules (default: every linear layer but the output head); only they train, and a sequence
    classifier's score head in full. B starts at 0, so the adapted model starts exactly equal to the base one."""
    path = resolve_model(name)
    config = AutoConfig.from_pretrained(path, **kwargs)
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    model = cls.from_pretrained(path, config=config, dtype=dtype, device_map=device)  # no full copy in host RAM first
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if lora is not None and lora.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha or 2 * lora.lora_r,
                                                 lora_dropout=lora.lora_dropout, target_modules=lora.lora_target_modules
                                                 or "all-linear", modules_to_save=["score"] * hasattr(model, "score")))
    return model.eval()


@contextlib.contextmanager
def as_reference(policy: torch.nn.Module, reference: torch.nn.Module | None):
    """pi_ref for the block: the reference model, or with LoRA (no reference loaded) the policy itself with its
    adapter switched off, i.e. the base weights pi_ref started from: no second copy of the model."""
    if reference is not None:
        yield reference
        return
    with unwrap(policy).disable_adapter():
        yield policy


def lora_merged(model, state: dict | None = None) -> tuple[dict, torch.nn.Module]:
    """A LoRA model's weights with the adapter merged, W + (alpha / r) B A, and each fully trained module's trained
    copy, under the base model's own names; and the base model to save them with. `state`: the LoRA model's full
    state dict (default: its own). The model is left as it is (training may go on)."""
    state, config = state or model.state_dict(), model.peft_config["default"]
    merged = {}
    for key, value in state.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        if key.endswith(".base_layer.weight"):
            stem = key[: -len("base_layer.weight")]
            delta = state[stem + "lora_B.default.weight"].float() @ state[stem + "lora_A.default.weight"].float()
            value = value + (config.lora_alpha / config.r * (delta.T if config.fan_in_fan_out else delta)).to(value)
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        merged[name.replace(".modules_to_save.default.", ".")] = value
    return merged, model.get_base_model()


def save_model(model: torch.nn.Module, tokenizer, output_dir: str, card: str | None = None):
    """Save the policy as an HF folder that `from_pretrained` loads (rank 0), with `card` as its README.md. Files are
    written to a temporary folder first and moved in, so an interrupted save leaves no half-written model behind."""
    state, model = None, unwrap(model)  # under FSDP2 every rank sends its shards, rank 0 saves the full state dict
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
            if hasattr(model, "merge_and_unload"):  # LoRA: the adapter alone in adapter/, then the merged weights
                model.save_pretrained(os.path.join(tmp, "adapter"), state_dict=state)
                state, model = lora_merged(model, state)
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            if card is not None:
                with open(os.path.join(tmp, "README.md"), "w") as f:
                    f.write(card)
            for name in os.listdir(tmp):
                if os.path.isdir(os.path.join(output_dir, name)):
                    shutil.rmtree(os.path.join(output_dir, name))  # an earlier run's adapter/
                os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    if dist.is_initialized():
        dist.barrier()

# ---- Checkpoints: --save-every, --resume ------------------------------------------------------------------------
RUN_FLAGS_THAT_MAY_CHANGE = {"output_dir", "run_name", "resume", "save_every", "keep_checkpoints", "report_to"}


def checkpoints(output_dir: str) -> list[str]:
    """The complete checkpoints in output_dir (checkpoint-<step> folders), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", n))
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def check_resume(args):
    """--resume: one error line, before anything is loaded, if output_dir holds no checkpoint or if the run's flags
    differ from the checkpoint's in anything but where it writes and how often it saves."""
    found = checkpoints(args.output_dir)
    if not found:
        fail(f"--resume: no checkpoint-<step> folder in --output-dir {args.output_dir} (give the run's --output-dir "
             f"or --run-name)")
    with open(os.path.join(found[-1], "args.json")) as f:
        saved = json.load(f)["flags"]
    now = json.loads(json.dumps(vars(args)))
    changed = [f"--{k.replace('_', '-')} {now.get(k)} (the checkpoint's: {saved.get(k)})" for k in sorted(saved)
               if k not in RUN_FLAGS_THAT_MAY_CHANGE and saved.get(k) != now.get(k)]
    if changed:
        fail(f"--resume: {found[-1]} was written with other flags: " + ", ".join(changed))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def save_checkpoint(args, step: int, model, optimizer, scheduler, extra: dict):
    """--output-dir/checkpoint-<step>: the trained weights and AdamW state (torch.distributed.checkpoint: under FSDP2
    each rank writes its own shards; LoRA's frozen base is left out), the scheduler, the flags, `extra` (e.g. the
    evaluation before training) and every rank's random-number states. Written into a .tmp folder and renamed once
    complete, so a crash during a save leaves the previous checkpoint as it was; the last --keep-checkpoints stay."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if is_main() and os.path.isdir(tmp):
        shutil.rmtree(tmp)  # what an earlier crash left
    if dist.is_initialized():
        dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(_rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    if is_main():
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "extra": extra}, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "args.json"), "w") as f:  # the run folder's args.json layout (make_logger)
            json.dump({"flags": vars(args)}, f, indent=1)
    if dist.is_initialized():
        dist.barrier()
    if is_main():
        os.replace(tmp, final)
        for old in checkpoints(args.output_dir)[:-args.keep_checkpoints]:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(output_dir: str, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore the latest checkpoint of output_dir into model, optimizer and scheduler, and this rank's random-number
    states; return (its step, its `extra`)."""
    latest = checkpoints(output_dir)[-1]
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=latest)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True))
    saved = torch.load(os.path.join(latest, "state.pt"), weights_only=False)
    scheduler.load_state_dict(saved["scheduler"])
    rng = torch.load(os.path.join(latest, f"rng-{dist.get_rank() if dist.is_initialized() else 0}.pt"),
                     weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    return saved["step"], saved["extra"]


# ---- Data: load_dataset on a hub id or a local file, TRL's formats, chat templates -----------------------------
def _source(name: str) -> tuple[str, dict]:
    """load_dataset arguments for a hub id, a local folder, or a local .json/.jsonl/.csv/.parquet file."""
    if os.path.isfile(name):
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(Path(name).suffix)
        if builder is None:
            fail(f"--dataset {name}: unknown file type (use .json, .jsonl, .csv or .parquet)")
        return builder, {"data_files": name}
    return name, {}


def load_splits(name: str, train_split: str, eval_split: str, num_eval: int, batch_size: int = 1,
                columns: str = "prompt") -> tuple:
    """(train, eval) rows of a dataset. Without `eval_split`, the last `num_eval` rows of train are held out.
    The train rows must fill at least one batch of `batch_size` (--batch-size) and have the `columns` a script
    needs (see `check_columns`)."""
    if name in (ARITHMETIC, ARITHMETIC_PREFERENCES, SORTING, SORTING_PREFERENCES):  # generated in code by embedded.py
        import embedded

        data = embedded.dataset(name)
    else:
        path, kwargs = _source(name)
        try:
            data = load_dataset(path, **kwargs)
        except Exception as e:  # a missing hub id, an unreadable file, or a file without rows
            if "corresponds to no data" in str(e):
                fail(f"--dataset {name}: split {train_split} has no rows")
            fail(f"--dataset {name}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if train_split not in data:
        fail(f"--train-split {train_split}: dataset {name} has splits {list(data)}")
    train = data[train_split]
    if eval_split in data:
        evaluation = data[eval_split].select(range(min(num_eval, len(data[eval_split]))))
    else:
        n = min(num_eval, len(train) // 10)
        evaluation, train = train.select(list(range(len(train) - n, len(train)))), train.select(range(len(train) - n))
    if len(train) == 0:
        fail(f"--dataset {name}: split {train_split} has no rows")
    if len(train) < batch_size:
        fail(f"--batch-size {batch_size} is more than the {len(train)} training rows of --dataset {name}")
    check_columns(train, name, columns)
    return train, evaluation


def _message_text(value) -> str:
    """A completion as text: a plain string, or the content of its message(s)."""
    if isinstance(value, str):
        return value
    return "".join(m["content"] for m in value)


def split_prompt(row: dict) -> tuple[object, str | None]:
    """(prompt, reference response or None) of one row in any of TRL's formats:
    prompt[/completion], prompt/chosen/rejected, chosen/rejected with the prompt implicit, or messages."""
    if "prompt" in row:
        reference = row.get("completion", row.get("chosen"))
        return row["prompt"], None if reference is None else _message_text(reference)
    conversation = row.get("messages", row.get("chosen"))
    if not isinstance(conversation, list):
        raise KeyError("prompt")
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last], conversation[last]["content"]


def render_prompt(prompt, tokenizer) -> str:
    """Prompt text as the policy sees it: conversations go through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template is None:
        fail("column 'prompt' holds conversations but the tokenizer of --model has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def check_columns(data: Dataset, name: str, columns: str = "prompt"):
    """One clear error if the dataset lacks the columns a script needs, before any model is loaded: "prompt" (a
    prompt in one of TRL's formats), "reference" (also a reference response) or "preference" (chosen, rejected)."""
    have = sorted(data.column_names)
    if columns == "preference":
        for missing in [c for c in ("chosen", "rejected") if c not in have]:
            fail(f"--dataset {name}: needs a '{missing}' column (preference pairs: [prompt,] chosen, rejected), "
                 f"has {have}")
    elif not set(have) & {"prompt", "messages", "chosen"}:
        fail(f"--dataset {name}: needs a 'prompt', 'messages' or 'chosen' column, has {have}")
    elif columns == "reference" and not set(have) & {"completion", "chosen", "messages"}:
        fail(f"--dataset {name}: needs a 'completion' or 'chosen' column (the reference response), has {have}")


def split_preference(row: dict) -> tuple[object, str, str]:
    """(prompt, chosen response, rejected response) of a preference row in TRL's formats: prompt/chosen/rejected,
    or chosen/rejected with the prompt implicit (their shared start: leading messages, or leading characters of
    plain text, as TRL's extract_prompt does). Conversational responses give their message content."""
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        return row["prompt"], _message_text(chosen), _message_text(rejected)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        n -= n > 0 and chosen[n - 1] == " "  # the separating space belongs to the responses
        return chosen[:n], chosen[n:], rejected[n:]
    return chosen[:n], _message_text(chosen[n:]), _message_text(rejected[n:])


def tokenize_prompts(data: Dataset, tokenizer, max_prompt_length: int) -> Dataset:
    """Rows -> prompt (as in the dataset), prompt text, prompt token ids (left-truncated to max_prompt_length) and
    reference response ids (EOS appended; empty when the dataset has none). The dataset's other columns stay: a
    reward function receives them as keyword arguments (see `make_scorer`)."""

    def encode(row):
        prompt, reference = split_prompt(row)
        text = render_prompt(prompt, tokenizer)
        ids = tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"][-max_prompt_length:]
        ref = [] if reference is None else tokenizer(reference, add_special_tokens=False)["input_ids"]
        return {"prompt": prompt, "prompt_text": text, "input_ids": ids,
                "reference_ids": ref + [tokenizer.eos_token_id] * bool(ref)}

    return data.map(encode)


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, attention_mask)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(sequences: list[list[int]], width: int, pad_id: int, device=None, eos_id: int | None = None
              ) -> torch.Tensor:
    """Right-pad (or cut) token lists to `width` columns; with eos_id, padding after each row's first EOS too."""
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        s = s[:width]
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device) if eos_id is None else cut_after_eos(ids.to(device), eos_id, pad_id)


def prompt_batches(data: Dataset, batch_size: int, seed: int, skip: int = 0):
    """Endless iterator of this rank's share of each global batch of rows (lists of dicts), after the first `skip`
    batches (those a resumed run's checkpoint already trained on).

    Every epoch is a fresh permutation (same on all ranks); rank r takes rows r, r+W, r+2W, ... of it, so the
    global batch is the same set of prompts for any number of processes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local = batch_size // world
    epoch = 0
    while True:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            mine = order[start:start + batch_size][rank::world]
            if skip:
                skip -= 1
                continue
            yield [data[i] for i in mine[:local]]
        epoch += 1


def shard(data: Dataset) -> Dataset:
    """This rank's contiguous share of an evaluation set; empty on some ranks when there are fewer rows than
    processes (every rank still takes part in the collectives that follow)."""
    if not dist.is_initialized():
        return data
    rank, world, n = dist.get_rank(), dist.get_world_size(), len(data)
    return data.select(range(rank * n // world, (rank + 1) * n // world))

# ---- Sampling and log-probs ------------------------------------------------------------------------------------
def eos_mask(responses: torch.Tensor, eos_id: int, budget: torch.Tensor | None = None) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after it (all 1 when there is no EOS); with a
    per-row `budget`, also 0 from position budget[i] on (those tokens were never part of the episode)."""
    is_eos = (responses == eos_id).long()
    mask = ((is_eos.cumsum(1) - is_eos) == 0).long()
    if budget is not None:
        positions = torch.arange(responses.shape[1], device=responses.device)
        mask = mask * (positions[None] < budget.to(responses.device)[:, None])
    return mask


def cut_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace everything after each response's first EOS with padding."""
    return responses.masked_fill(eos_mask(responses, eos_id) == 0, pad_id)


def reset_points(lengths: torch.Tensor) -> torch.Tensor:
    """The reset draw of PPO++ and DR-PO: a point uniform over {1, ..., L - 1} for each length L (so the learner
    always writes at least the last token); 0 (no reset) where L < 2."""
    k = 1 + (torch.rand(len(lengths)) * (lengths.cpu() - 1)).floor().long()
    return torch.where(lengths.cpu() >= 2, k, 0)


def has_eos(responses: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Whether each response ended with EOS within its mask (bool)."""
    return ((responses == eos_id) & (mask > 0)).any(1)


@torch.no_grad()
def generate(model, tokenizer, query: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int,
             temperature: float, batch_size: int | None = None, backend: str | None = None,
             group: int = 1) -> torch.Tensor:
    """Sample responses [B, max_new_tokens] from softmax(logits / T) exactly (no top-k, top-p or other processor:
    `InverseCDFSampler` draws each token), cut after the first EOS, in calls of `batch_size` sequences
    (--generation-batch-size: bounds the KV cache; None: all at once). temperature 0 decodes greedily. Under FSDP2 the
    model is held whole meanwhile (`gathered`).

    transformers fills every field we leave unset from the model's own `generation_config` (a checkpoint's
    repetition_penalty, min_p, suppress_tokens, min_new_tokens, ...), and then samples would not come from the
    distribution every log-prob assumes. So the model's config is swapped for a blank one during the call.

    backend (--generation-backend; None: the process's, GENERATION_BACKEND): "dynamic" is plain `generate`, whose KV
    cache grows by a copy at every step. "static" preallocates the cache for prompt + max_new_tokens and, on a GPU,
    transformers compiles the one-token decoding step and replays it as a CUDA graph (the first call per shape
    compiles: 20-35 s for Pythia-1B on an H200): the same forward and the same sampler, so the same distribution.
    Its prompts are left-padded to a multiple of STATIC_BUCKET tokens (masked, positions from the mask: nothing
    changes but the shape), so iterations reuse the compiled shapes. Under autocast over fp32 weights (the scripts'
    bf16 on a GPU) it samples from a bf16 copy of the weights (`sampling_copy`), as an inference engine would: the
    same model at the precision autocast computes in; a LoRA model samples dynamic there (a copy would not follow
    its adapter being switched off for pi_ref). "auto": static on a GPU (not under FSDP2, not LoRA under autocast),
    dynamic otherwise.

    group > 1: rows j*b + i (j < group) hold the same prompt i, a prompt's samples as the scripts lay them out. The
    dynamic backend then prefills each prompt once and repeats its KV cache for its rows (`query_cache`; where that
    saves SHARED_QUERY_MIN_TOKENS or more): the same logits up to float rounding, so the same distribution; a call of
    batch_size sequences holds whole groups."""
    backend, kind, lora = backend or GENERATION_BACKEND, query.device.type, hasattr(unwrap(model), "peft_config")
    cast = torch.is_autocast_enabled(kind) and next(model.parameters()).dtype != torch.get_autocast_dtype(kind)
    if backend == "auto" or backend == "static" and cast and lora:  # no bf16 copy of a LoRA model: its adapter
        sharded = any(isinstance(m, FSDPModule) for m in unwrap(model).modules())  # switches (as_reference)
        backend = "static" if query.is_cuda and not sharded and not (cast and lora) else "dynamic"
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, do_sample=False)  # greedy over the sampler's pick
    sampler = LogitsProcessorList([InverseCDFSampler(temperature)] if temperature > 0 else [])
    model, responses = unwrap(model), query.new_full((len(query), max_new_tokens), tokenizer.pad_token_id)
    precision = contextlib.nullcontext()
    if backend == "static":
        config.cache_implementation = "static"
        extra = -query.shape[1] % STATIC_BUCKET
        query, query_mask = F.pad(query, (extra, 0), value=tokenizer.pad_token_id), F.pad(query_mask, (extra, 0))
        if cast:
            model, precision = sampling_copy(model, torch.get_autocast_dtype(kind)), torch.autocast(kind, enabled=False)
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with eval_mode(model), gathered(model), precision:
            for rows in group_chunks(len(query), group, batch_size or len(query), query.device):
                cache = {}
                if backend == "dynamic" and sharing_pays(len(rows), group, query.shape[1] - 1):  # a prompt prefilled once
                    cache = {CACHE: query_cache(model, query[rows, :-1], query_mask[rows, :-1], group)[1]}
                out = model.generate(input_ids=query[rows], attention_mask=query_mask[rows], generation_config=config,
                                     logits_processor=sampler, synced_gpus=False, **cache)
                responses[rows] = F.pad(out[:, query.shape[1]:], (0, max_new_tokens - (out.shape[1] - query.shape[1])),
                                        value=tokenizer.pad_token_id)
    finally:
        model.generation_config = saved
    return cut_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)


class InverseCDFSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores / T) and leaves only that token a finite score, so that
    `generate`'s greedy step takes it: an exact sampler. One uniform u per row, the token at which the cumulative sum
    (float64) of exp((scores - max) / T) first exceeds u times its total. torch.multinomial, which `do_sample`
    uses, draws an exponential for every vocabulary entry instead: 60 ms a decoding step for 32 rows x 49k tokens on
    2 CPU cores, against 5-10 ms here. Draws come from torch's default generator, so torch.manual_seed fixes them."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scaled = (scores - scores.max(-1, keepdim=True).values).div_(self.temperature)  # <= 0: exp cannot overflow
        cdf = scaled.double().exp_().cumsum_(-1)
        u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # right: never a 0-mass token
        return torch.full_like(scores, -math.inf).scatter_(1, tokens, 0.0)


_SAMPLING_COPIES = weakref.WeakKeyDictionary()


@torch.no_grad()
def sampling_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model with its parameters in `dtype` (buffers as they are), for the static backend under autocast: there
    fp32 weights give fp32 keys (rotary embeddings run in fp32) but bf16 values, which a static cache of one dtype
    cannot hold, and every decoding step would read 4-byte weights and cast them again. Made once per model
    (+2 bytes a parameter, no fp32 copy on the way) and refreshed in place at every call, so the parameters keep
    their addresses and the compiled CUDA graph stays valid while the policy trains."""
    shadow = _SAMPLING_COPIES.get(model)
    if shadow is None:
        memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
        shadow = _SAMPLING_COPIES[model] = copy.deepcopy(model, memo)
    else:
        for copied, p in zip(shadow.parameters(), model.parameters()):
            copied.copy_(p)
    return shadow


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """ln softmax(logits / T) at `tokens`, in float32 (log_softmax: one fused kernel each way)."""
    return torch.gather(F.log_softmax(logits.float() / temperature, -1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs(model, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
             response_mask: torch.Tensor, temperature: float, micro_batch: int | None = None,
             entropy: bool = False, group: int = 1) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ln pi(response_t | query, response_<t) at temperature T for every response token, 0 off the mask ([B, R]);
    sum over dim 1 for a sequence's log-prob. entropy=True also returns each position's entropy (a statistic: no
    gradient). With micro_batch, a no-grad pass in forwards of that many sequences (old and reference log-probs).

    One forward of query + response[:, :-1] (the last token's logits would predict nothing, and causal attention
    means no earlier position sees it): position ids come from the attention mask, so left padding does not shift
    positions, and only the last R positions go through the LM head (logits_to_keep). The log-softmax runs over
    chunks of positions in float32 (the backward recomputes each chunk), so no float32 copy of the whole
    [B, R, vocab] logits ever exists: at a 128k vocabulary that copy is 4 GB for 4 sequences of 2k tokens.

    group > 1: rows j*b + i (j < group) hold the same query i, as the scripts lay out a prompt's samples. Each query
    then goes through the model once, and its KV cache serves its group's responses (`shared_query_logits`), where
    that saves at least SHARED_QUERY_MIN_TOKENS tokens of forward."""
    if micro_batch is not None:  # no-grad passes (rollouts, evaluation), micro_batch sequences per forward
        chunks = group_chunks(len(query), group, micro_batch, query.device)
        with torch.no_grad(), eval_mode(model), gathered(model):  # eval: the cache `group` shares survives
            parts = [logprobs(model, query[i], query_mask[i], response[i], response_mask[i], temperature, None, entropy,
                              group) for i in chunks]
        order = torch.cat(chunks).argsort()  # back to the caller's row order
        return tuple(torch.cat(p)[order] for p in zip(*parts)) if entropy else torch.cat(parts)[order]
    checkpointed = model.training and any(  # transformers' checkpointing drops the KV cache (in train mode)
        getattr(m, "gradient_checkpointing", False) for m in unwrap(model).modules())
    if sharing_pays(len(query), group, query.shape[1]) and not checkpointed and response.shape[1] > 1:
        logits = shared_query_logits(model, query, query_mask, response, response_mask, group)
    else:
        ids, mask = torch.cat([query, response[:, :-1]], 1), torch.cat([query_mask, response_mask[:, :-1]], 1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    logits_to_keep=response.shape[1], use_cache=False)
        logits = out.logits  # the shift: the logits at position Q - 1 + t predict response[:, t]
    step = max(1, LOGPROB_CHUNK // (logits.shape[0] * logits.shape[2]))  # positions per chunk
    logp, entropies = [], []
    for t in range(0, logits.shape[1], step):
        chunk, tokens = logits[:, t:t + step], response[:, t:t + step]
        if torch.is_grad_enabled():
            logp.append(torch.utils.checkpoint.checkpoint(_token_logprobs, chunk, tokens, temperature,
                                                          use_reentrant=False))
        else:
            logp.append(_token_logprobs(chunk, tokens, temperature))
        if entropy:
            with torch.no_grad():
                scaled = chunk.float() / temperature
                entropies.append(torch.logsumexp(scaled, -1) - (torch.softmax(scaled, -1) * scaled).sum(-1))
    logp = torch.cat(logp, 1) * response_mask
    return (logp, torch.cat(entropies, 1)) if entropy else logp


def shared_query_logits(model, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                        response_mask: torch.Tensor, group: int) -> torch.Tensor:
    """The logits [B, R, vocab] that predict each response token, with rows j*b + i sharing query i: the b queries
    go through the model once (use_cache: their keys and values), the cache is repeated for the group's rows, and
    the responses go through on top of it. The same numbers as one forward of each query + response, up to float
    rounding, for (R + Q/group)/(R + Q) of the work: REBEL's pair on a 500-token TL;DR post and a 53-token summary
    costs 0.55x. Gradients flow into the queries' forward through the cache. The queries' forward bypasses a DDP
    wrapper (two DDP forwards before one backward fail); the backward still all-reduces every gradient."""
    first_logits, cache = query_cache(unwrap(model), query, query_mask, group)
    mask = torch.cat([query_mask, response_mask[:, :-1]], 1)  # the last token predicts nothing: not fed
    out = model(input_ids=response[:, :-1], attention_mask=mask, position_ids=(mask.cumsum(1) - 1)[:, query.shape[1]:],
                logits_to_keep=response.shape[1] - 1, use_cache=True, **{CACHE: cache})
    return torch.cat([first_logits.repeat(group, 1, 1), out.logits], 1)


def sharing_pays(rows: int, group: int, prompt_tokens: int) -> bool:
    """Whether `rows` rows in groups of `group` sharing a prompt of prompt_tokens tokens spare at least
    SHARED_QUERY_MIN_TOKENS tokens of forward by running each prompt once (`generate`, `logprobs`)."""
    return group > 1 and (group - 1) * rows // group * prompt_tokens >= SHARED_QUERY_MIN_TOKENS


def group_chunks(rows: int, group: int, size: int, device: torch.device) -> list[torch.Tensor]:
    """Row indices of calls of about `size` rows that hold whole groups (rows j*b + i, j < group, share prompt i):
    each call takes max(1, size // group) prompts with all their rows, in the same j*b + i order."""
    prompts = torch.arange(rows, device=device).view(group, -1)  # column i: prompt i's rows
    per = max(1, size // group)
    return [prompts[:, start:start + per].flatten() for start in range(0, prompts.shape[1], per)]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode for the block, then as it was: transformers' gradient checkpointing (train mode only)
    drops the KV cache that sampling and shared prompts need; dropout is 0 everywhere, so nothing else changes."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def query_cache(model, query: torch.Tensor, query_mask: torch.Tensor, group: int):
    """Rows j*b + i (j < group) hold the same query i: run the b queries through `model` once and return their
    logits at the last position ([b, 1, vocab]) and their KV cache, repeated so that row j*b + i holds query i's."""
    b = len(query) // group
    if group * b != len(query) or not torch.equal(query.view(group, b, -1), query[:b].expand(group, -1, -1)):
        raise ValueError(f"group={group}: rows j*b + i must hold the same query i")
    out = model(input_ids=query[:b], attention_mask=query_mask[:b], logits_to_keep=1, use_cache=True,
                position_ids=(query_mask[:b].cumsum(1) - 1).clamp(min=0))
    cache = getattr(out, CACHE)
    if cache is None or cache.get_seq_length() != query.shape[1]:  # never score responses without their prompt
        raise RuntimeError("the model returned no KV cache for the shared prompts (checkpointing in train mode?)")
    cache.reorder_cache(torch.arange(b, device=query.device).repeat(group))  # index_select: gradients flow back
    return out.logits, cache


# ---- Rewards: a reward model or a Python function, and the no-EOS penalty --------------------------------------
def load_reward_fn(spec: str, flag: str = "--reward-fn"):
    """`module:function` (or `path/to/file.py:function`) -> the function. Errors name `flag`."""
    if ":" not in spec:
        fail(f"{flag} {spec}: expected module:function")
    module_name, function = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, function)
    except (ImportError, AttributeError, FileNotFoundError) as e:
        fail(f"{flag} {spec}: {e}")


def call_user_fn(function, flag: str, *args, **kwargs):
    """Call a user's reward, user or judge function. An exception inside it stops the run with one line naming the
    flag, the error and where it was raised; the full traceback stays attached as the exception's cause."""
    try:
        return function(*args, **kwargs)
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise SystemExit(f"error: {flag} raised {type(e).__name__}: {e} "
                         f"(at {os.path.basename(where.filename)}:{where.lineno})") from e


def check_scores(values, n: int, source: str, device=None) -> torch.Tensor:
    """Rewards as a float tensor of n values; a wrong count or a NaN/inf stops the run before it trains on them
    (nothing is saved: a model from an earlier run in --output-dir stays as it was)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    values = [float("nan") if v is None else float(v) for v in values]
    if len(values) != n:
        fail(f"{source} returned {len(values)} rewards for {n} responses")
    scores = torch.tensor(values, dtype=torch.float, device=device)
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero()[0].item()
        fail(f"{source} returned {values[bad]} for response {bad}; stopping before training on it (nothing saved)")
    return scores


def column_kwargs(rows: list[dict]) -> dict:
    """The dataset's other columns as keyword lists for a reward function (TRL's convention): every column but the
    prompt, the completion and what tokenize_prompts added."""
    internal = {"prompt", "completion", "prompt_text", "input_ids", "reference_ids"}
    return {key: [row[key] for row in rows] for key in rows[0] if key not in internal} if rows else {}


def scalar_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head of a one-label AutoModelForSequenceClassification at every position ([B, L]): the reward
    model reads it at the last real token, PPO's value model at every response token. The model's own forward keeps
    only the last token, so the head's full output is caught by a hook (the forward still runs through the root
    module: DDP and FSDP2 hooks fire)."""
    caught = []
    hook = unwrap(model).score.register_forward_hook(lambda module, inputs, output: caught.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
              position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0))
    finally:
        hook.remove()
    return caught[0].squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for either padding side. (transformers' own pooling looks for the
    first pad id, which picks the wrong token when pad id == EOS id.)"""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)


def reward_model_texts(prompts: list, prompt_texts: list[str], responses: list[str], tokenizer) -> list[str]:
    """What the reward model reads: its own chat template over conversations, else prompt text + response + EOS
    (reward models trained on TL;DR read the score at the EOS token; a response without EOS gets the no-EOS penalty
    instead of this score anyway)."""
    if tokenizer.chat_template is not None and all(isinstance(p, list) for p in prompts):
        return [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
                for p, r in zip(prompts, responses)]
    return [p + r + tokenizer.eos_token for p, r in zip(prompt_texts, responses)]


@torch.no_grad()
def reward_model_scores(model, tokenizer, texts: list[str], micro_batch: int = 16) -> torch.Tensor:
    """Reward-model score of each text at its last real token (the EOS), in micro-batches, plus the model config's
    `reward_offset` if it has one (reward.py --normalize sets it: the score heads of most architectures have no
    bias to shift; 0 when absent)."""
    scores = []
    device = next(model.parameters()).device
    offset = getattr(model.config, "reward_offset", 0.0)
    with gathered(model):  # under FSDP2 one all-gather per call, however many texts this rank has
        for i in range(0, len(texts), micro_batch):
            enc = tokenizer(texts[i:i + micro_batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device)
            values = scalar_head(model, enc["input_ids"], enc["attention_mask"])
            last = last_token_index(enc["attention_mask"])[:, None]
            scores.append(values.gather(1, last).squeeze(1).float() + offset)
    return torch.cat(scores) if scores else torch.zeros(0, device=device)


def make_scorer(reward_model: str | None, reward_fn: str, device: torch.device, dtype: torch.dtype,
                fsdp: bool = False):
    """score(rows, completions) -> tensor of rewards, from --reward-model if given, else --reward-fn. `rows` are
    tokenized dataset rows (tokenize_prompts), `completions` the response texts (after any reset prefix).

    A reward function is called as TRL's trainers call theirs, f(prompts=..., completions=..., **columns): prompts
    as in the dataset (strings or message lists), completions as strings (a one-message assistant turn after a
    conversational prompt), every other column as a keyword list (e.g. `answer=[...]`): a function written for TRL's
    GRPO/RLOO runs unchanged."""
    if reward_model is None:
        function = load_reward_fn(reward_fn)

        def score_fn(rows, completions):
            prompts = [row["prompt"] for row in rows]
            completions = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c  # as TRL passes them
                           for p, c in zip(prompts, completions)]
            values = call_user_fn(function, f"--reward-fn {reward_fn}", prompts=prompts, completions=completions,
                                  **column_kwargs(rows))
            return check_scores(values, len(rows), f"--reward-fn {reward_fn}", device)

        return score_fn
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(reward_model)
    tokenizer.padding_side = "right"
    model = load_model(reward_model, device, dtype, AutoModelForSequenceClassification, num_labels=1)
    model = wrap(model.requires_grad_(False), device, dtype, fsdp)

    def score_model(rows, completions):
        texts = reward_model_texts([r["prompt"] for r in rows], [r["prompt_text"] for r in rows], completions,
                                   tokenizer)
        return check_scores(reward_model_scores(model, tokenizer, texts), len(rows), f"--reward-model {reward_model}")

    return score_model

# ---- Evaluation, logging ---------------------------------------------------------------------------------------
@torch.no_grad()
def score_held_out(model, tokenizer, data: Dataset, score, max_new_tokens: int, temperature: float, batch_size: int,
                   device) -> dict:
    """Mean reward, EOS fraction and length of responses to the (tokenized) evaluation prompts, always from the
    bare prompt, over all ranks. temperature 0 = greedy (for the embedded task the mean reward is the accuracy).

    Each rank takes an equal share of the rows, the last shares padded with row 0 at weight 0, so that every rank
    makes the same calls (FSDP2 gathers the reward model once per call)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = -(-len(data) // world)
    mine = range(rank * share, (rank + 1) * share)
    weights = torch.tensor([float(i < len(data)) for i in mine], device=device)
    rows = data.select([i if i < len(data) else 0 for i in mine]).to_list()
    totals = torch.zeros(4, device=device)
    for i in range(0, share, batch_size):
        batch, weight = rows[i:i + batch_size], weights[i:i + batch_size]
        query, query_mask = left_pad([r["input_ids"] for r in batch], tokenizer.pad_token_id, device)
        responses = generate(model, tokenizer, query, query_mask, max_new_tokens, temperature)
        mask = eos_mask(responses, tokenizer.eos_token_id)
        scores = score(batch, tokenizer.batch_decode(responses, skip_special_tokens=True))
        ended = has_eos(responses, mask, tokenizer.eos_token_id).float()
        totals += torch.stack([scores @ weight, ended @ weight, mask.sum(1).float() @ weight, weight.sum()])
    totals = all_reduce(totals)
    n = totals[3].clamp(min=1)
    return {"score": (totals[0] / n).item(), "eos_fraction": (totals[1] / n).item(), "length": (totals[2] / n).item()}


def make_scheduler(optimizer, schedule: str, warmup_ratio: float, total_steps: int):
    """transformers' --lr-schedule: a linear warm-up over the first warmup_ratio of the optimizer steps, then
    linear or cosine decay to 0 at the last step, or constant."""
    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=round(warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def make_logger(output_dir: str, report_to: str, config: dict, device, resume_step: int = 0):
    """log(metrics, step), called on every rank: each metric's mean over all processes, then (rank 0) one line on
    stdout, a JSON line in output_dir/metrics.jsonl, and tensorboard or wandb when --report-to asks for it.

    A loss that is NaN or infinite stops the run there: every rank sees the same means, so all stop together, before
    anything is saved (an earlier model and its metrics.jsonl in --output-dir stay as they were). A resumed run keeps
    the lines up to its checkpoint's step `resume_step` (a killed run may have logged past it), and continues."""
    os.makedirs(output_dir, exist_ok=True)
    if is_main():  # args.json: every flag, and what ran them
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True).stdout.strip() or None
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump({"flags": config, "git_commit": commit, "torch": torch.__version__, "transformers":
                       transformers.__version__, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                       "device": str(device)}, f, indent=1)
    path = os.path.join(output_dir, "metrics.jsonl")
    started = []  # metrics.jsonl is rewritten at the first log, so a run stopped before it keeps an earlier file
    kept = []  # on resume: the lines up to the checkpoint's step's own line
    for line in open(path) if resume_step else []:
        kept.append(line)
        if json.loads(line)["step"] >= resume_step:
            break
    writer = None
    if is_main() and report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(output_dir)
    elif is_main() and report_to == "wandb":
        import wandb

        wandb.init(project=config.get("exp_name"), name=config.get("run_name"), config=config, dir=output_dir)
    elif is_main() and report_to == "trackio":
        import trackio

        trackio.init(project=config.get("exp_name"), name=config.get("run_name"), config=config, embed=False)

    def log(metrics: dict, step: int):
        from tqdm import tqdm

        tensors = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]  # floats are the same on every rank
        if tensors:
            means = all_reduce(torch.stack([metrics[k].to(device).float().detach() for k in tensors]), mean=True)
            metrics = metrics | dict(zip(tensors, means.tolist()))
        for key, value in metrics.items():
            if "loss" in key and not math.isfinite(value):
                fail(f"the {key} is {value}: stopping without saving (lower --lr, or check the rewards)")
        if not is_main():
            return
        tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        with open(path, "a" if started else "w") as f:
            f.writelines(kept if not started else [])
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        started.append(step)
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
            writer.flush()
        elif report_to in ("wandb", "trackio"):
            importlib.import_module(report_to).log(metrics, step=step)

    return log


def finish(model, tokenizer, args, evaluation: dict, what: str = "policy"):
    """The end of a training run: save the model (`save_model`) with a model card (how it was trained, the
    evaluation before and after), say where, close the tracker, and leave the process group."""
    save_model(model, tokenizer, args.output_dir, model_card(args, evaluation))
    print0(f"saved the {what} to {args.output_dir}")
    if is_main() and args.report_to in ("wandb", "trackio"):
        importlib.import_module(args.report_to).finish()
    clean_exit()


def model_card(args, evaluation: dict) -> str:
    """README.md of a trained model's folder: the script, base model, data, reward, evaluation and every flag."""
    reward = getattr(args, "reward_model", None) or getattr(args, "reward_fn", None)
    rows = {}
    for when, values in evaluation.items():  # a dict of metrics, or REFUEL's list of per-turn rewards
        for key, value in (values.items() if isinstance(values, dict) else
                           ((f"reward at turn {t}", v) for t, v in enumerate(values, 1))):
            rows.setdefault(key, {})[when] = value
    table = ["| held-out | " + " | ".join(evaluation) + " |", "|---" * (len(evaluation) + 1) + "|"]
    table += [f"| {key} | " + " | ".join(f"{v.get(w, float('nan')):.4g}" for w in evaluation) + " |"
              for key, v in rows.items()]
    return "\n".join([f"# {args.run_name}", "", f"Trained by `{args.exp_name}.py` (reset- and regression-based RL "
                      f"for language models) from `{args.model}` on `{args.dataset}`"
                      + (f", reward: `{reward}`." if reward else "."), "", *table, "", "Every flag of the run:", "",
                      "```json", json.dumps(vars(args), indent=1), "```", ""])


def clean_exit():
    """Leave the process group (end of a torchrun job) once every rank is done with its collectives (a rank that
    tears gloo down while another is still working can abort: "terminate called without an active exception").

    The group is destroyed when the interpreter exits, after main() has returned and its models are collected: a
    DistributedDataParallel wrapper's reducer holds the group, and releasing it after destroy_process_group can
    deadlock in ProcessGroupGloo's destructor (seen: a rank that never exits, stuck there)."""
    if dist.is_initialized():
        dist.barrier()
        atexit.register(lambda: (gc.collect(), dist.destroy_process_group()))
