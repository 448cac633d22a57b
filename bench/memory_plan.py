"""Per-GPU memory of every multi-GPU README recipe, by arithmetic: no GPU, no downloads.

    python bench/memory_plan.py               # the table; exit status 1 if a recipe's peak is over the limit
    python bench/memory_plan.py --gpu-gib 76  # the limit per GPU in GiB (default 76: an 80 GB H100 shows 79.6 GiB;
                                              # ~3.6 GiB are left for the CUDA context, NCCL and fragmentation)

The `torchrun --nproc_per_node W <script>.py ...` commands come from README.md's shell blocks through the shell
reader of tests/test_readme.py; each argv is parsed by the script's own `tyro.cli(Args)` (defaults included). A
local `--model runs/...` is the `--output-dir` of an earlier README command and resolves to that command's model.
Models are built from configs in code (CONFIGS) on the meta device, so parameter counts are exact; an id missing
from CONFIGS skips its command with a note. Only the RL scripts (ppo, ppo_plus, drpo, rebel, refuel) are planned.

Per GPU, N = parameters, W = world size, b = bytes of --dtype (auto = bfloat16 on GPU: 2):
  trained  policy (+ the value model, a sequence-classification copy of --reward-model or --model, in ppo.py,
           ppo_plus.py, drpo.py): fp32 weights + fp32 grads + AdamW's 2 fp32 moments = 16 B/param, /W under
           --fsdp; under DDP 20 B/param: common.wrap keeps DDP's default gradient_as_bucket_view=False, so the
           all-reduce buckets are a second fp32 copy of the gradients.
  frozen   reference (rebel and the PPO family always, refuel when --kl-coef != 0): fp32, 4 B/param, /W under
           --fsdp; reward model: b B/param, /W under --fsdp; LLM user (refuel --user-model): b B/param, never sharded.
  LoRA     with --lora-r r: "trained" is the adapters, r x (fan-in + fan-out) per linear layer but the output head
           (plus the value model's score head), and the base weights of policy (and value model) are frozen fp32,
           4 B/param; no reference is loaded (pi_ref is the policy with its adapter off).
  sampling --generation-backend static (auto's choice on a GPU without --fsdp, and not for LoRA) samples from a b-byte
           copy of each model it samples from, kept for the whole run (common.sampling_copy): b B/param of the
           policy, and of the reference where it samples too (ppo_plus's roll-ins, rebel --mu reference), in "frozen".
  copy     a b-byte working copy of weights. --fsdp: sampling and no-grad passes all-gather one whole model at a
           time (assumed: FSDP2 with param_dtype = b-byte dtype), so b x the largest sharded model; the update pass
           gathers one layer at a time (neglected). DDP: autocast caches the bf16 cast of every fp32 weight that
           requires grad for as long as its context is open (checked on CPU, torch 2.13, no_grad too), and the
           update's backward keeps them, so b x the trained parameters in every phase.
  KV       2 (K, V) x layers x kv_heads x head_dim x b x G x (max_prompt_length + max_new_tokens); G =
           --generation-batch-size, else the local batch: batch_size/W prompts (PPO family; rebel --mu
           reference|dataset, whose two responses come from two generate calls), 2 x batch_size/W (rebel, refuel).
           refuel: the larger of the policy's cache and the user's (length max_prompt_length + user_max_new_tokens);
           refuel.py as written samples --micro-batch-size dialogues a call (sample_turns), fewer than this G.
  act      the update's activations for one micro-batch of S = batch_size/W x (2 for rebel/refuel: y and y' go
           through together) / num_minibatches / grad_accum_steps sequences of T = max_prompt_length +
           max_new_tokens tokens (an upper bound: real prompts are often shorter). Per layer, 16-bit:
           T x S x (18 h + 4 I) bytes for a GELU MLP, T x S x (18 h + 8 I) for a gated (SwiGLU) MLP, h = hidden,
           I = intermediate: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
           Models", sbh(34 + 5as/h) with the MLP width made explicit (34 = 18 + 4 x 4) and the 5as^2b score term
           dropped since SDPA/flash attention does not store the score matrix; the gated MLP keeps two more I-wide
           tensors. --gradient-checkpointing: 2 x T x S x h per layer (its input) + one layer in full. PPO family:
           policy + value model.
  logits   the trained forward's S x (max_new_tokens + 1) x vocab logits (common.logprobs: logits_to_keep) at 4 B
           each: the b-byte logits and their b-byte gradient; common.logprobs takes the fp32 log-softmax over chunks
           of 64 MB and recomputes each in the backward (bench/logprob_memory.py measures it). no-grad: the same
           for micro_batch_size sequences (an upper bound: no gradient there).
  peak     trained + frozen + max(copy + KV, [DDP: copy] + act + logits, copy + no-grad logits)
"DDP peak" is the same recipe without --fsdp. Not counted: the CUDA context, NCCL buffers, allocator fragmentation
(the reserve under the default 76 GiB), the no-grad passes' layer-at-a-time activations, tokenised data.
"""

import argparse
import functools
import importlib
import os
import re
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
import tyro  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPTNeoXConfig,  # noqa: E402
                          LlamaConfig, MistralConfig, Qwen2Config)

import test_readme  # noqa: E402  (tests/: the README shell reader)

GIB = 2 ** 30
PPO_FAMILY = {"ppo.py", "ppo_plus.py", "drpo.py"}
PAIRED = {"rebel.py", "refuel.py"}  # two responses per prompt
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
LOGIT_BYTES = 4


def pythia(hidden: int, layers: int, heads: int, intermediate: int):
    return functools.partial(GPTNeoXConfig, vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=intermediate, rotary_pct=0.25,
                             max_position_embeddings=2048, tie_word_embeddings=False)


LLAMA3_8B = functools.partial(LlamaConfig, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                              max_position_embeddings=8192, tie_word_embeddings=False)
MISTRAL_7B = functools.partial(MistralConfig, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                               tie_word_embeddings=False)
QWEN25_1_5B = functools.partial(Qwen2Config, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                max_position_embeddings=32768, tie_word_embeddings=True)
PYTHIA = {"1b": pythia(2048, 16, 8, 8192), "2.8b": pythia(2560, 32, 32, 10240), "6.9b": pythia(4096, 32, 32, 16384)}
CONFIGS = {"meta-llama/Meta-Llama-3-8B-Instruct": LLAMA3_8B, "meta-llama/Llama-3.1-8B-Instruct": LLAMA3_8B,
           "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": LLAMA3_8B, "RLHFlow/ArmoRM-Llama3-8B-v0.1": LLAMA3_8B,
           "openbmb/Eurus-RM-7b": MISTRAL_7B, "Qwen/Qwen2.5-1.5B": QWEN25_1_5B}
"""hub id -> config constructor; Pythia ids (EleutherAI/pythia-1b-deduped, cleanrl/..., vwxyzjn/...) go by size"""


class UnknownModel(KeyError):
    pass


def model_config(name: str):
    size = re.search(r"pythia-(\d+(?:\.\d+)?[mb])\b", name)
    make = CONFIGS.get(name) or (PYTHIA.get(size.group(1)) if size else None)
    if make is None:
        raise UnknownModel(name)
    return make()


@functools.cache
def num_params(name: str, scalar_head: bool = False) -> int:
    """Exact parameter count: a causal LM, or with scalar_head a one-label sequence classifier (reward/value)."""
    config = model_config(name)
    config.num_labels = 1
    cls = AutoModelForSequenceClassification if scalar_head else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    return sum(p.numel() for p in model.parameters())


@functools.cache
def lora_params(name: str, r: int, scalar_head: bool = False) -> int:
    """Parameters of rank-r LoRA adapters on every linear layer but the output head (peft's "all-linear"): r x
    (fan-in + fan-out) each; with scalar_head, plus the one-label score head, which trains in full."""
    config = model_config(name)
    config.num_labels = 1
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if scalar_head else AutoModelForCausalLM).from_config(config)
    heads = {"score", "lm_head", "embed_out"}
    adapters = sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in heads)
    return adapters + (sum(p.numel() for p in model.score.parameters()) if scalar_head else 0)


def trained_bytes(n: int, world: int, fsdp: bool) -> float:
    return 16 * n / world if fsdp else 20 * n


def kv_bytes(config, sequences: int, length: int, nbytes: int = 2) -> int:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * nbytes * sequences * length


def activation_bytes(config, sequences: int, length: int, checkpointing: bool, nbytes: int = 2) -> float:
    h, width = config.hidden_size, config.intermediate_size * (2 if config.model_type in ("llama", "mistral") else 1)
    layer = length * sequences * (18 * h + 4 * width) * nbytes / 2
    if checkpointing:
        return config.num_hidden_layers * 2 * length * sequences * h * nbytes / 2 + layer
    return config.num_hidden_layers * layer


def logit_bytes(config, sequences: int, new_tokens: int) -> int:
    return sequences * (new_tokens + 1) * config.vocab_size * LOGIT_BYTES


@dataclass
class Row:
    line: int
    script: str
    world: int
    fsdp: bool
    checkpointing: bool
    models: str  # parameters in billions: policy (+ reward model, user)
    sizes: dict  # G, S, T
    parts: dict = field(default_factory=dict)  # component -> bytes
    peak: float = 0.0
    ddp_peak: float = 0.0


def components(script: str, world: int, a, fsdp: bool) -> dict:
    """Bytes per GPU of each component, and the peak, for one script's args (any namespace with its fields)."""
    policy, ppo, nbytes = model_config(a.model), script in PPO_FAMILY, DTYPE_BYTES[a.dtype]
    n_policy = num_params(a.model)
    n_value = num_params(a.reward_model or a.model, True) if ppo else 0
    n_reward = num_params(a.reward_model, True) if a.reward_model else 0
    user = getattr(a, "user_model", None)
    shard = world if fsdp else 1
    r = getattr(a, "lora_r", 0)  # LoRA: no reference (the policy with its adapter off), frozen fp32 base weights
    has_reference = (script != "refuel.py" or a.kl_coef != 0) and not r
    n_lora = lora_params(a.model, r) + (lora_params(a.reward_model or a.model, r, True) if ppo else 0) if r else 0
    local = a.batch_size // world
    pairs = 2 if script in PAIRED and getattr(a, "mu", "policy") == "policy" else 1
    gen = min(getattr(a, "generation_batch_size", None) or local * pairs, local * pairs)
    micro = local * (2 if script in PAIRED else 1) // (a.num_minibatches * a.grad_accum_steps)
    length, gc = a.max_prompt_length + a.max_new_tokens, getattr(a, "gradient_checkpointing", False)
    kv = kv_bytes(policy, gen, length, nbytes)
    if user:
        kv = max(kv, kv_bytes(model_config(user), gen, a.max_prompt_length + a.user_max_new_tokens, nbytes))
    act = activation_bytes(policy, micro, length, gc, nbytes)
    if ppo:
        act += activation_bytes(model_config(a.reward_model or a.model), micro, length, gc, nbytes)
    n_trained = n_lora if r else n_policy + n_value
    backend = getattr(a, "generation_backend", "auto")
    samplers = 1 + (has_reference and (script == "ppo_plus.py" or getattr(a, "mu", "policy") == "reference"))
    static = nbytes == 2 and not r and (backend == "static" or backend == "auto" and not fsdp)
    sampling_copy = nbytes * n_policy * samplers if static else 0
    ddp_copy = nbytes * n_trained if nbytes == 2 else 0
    parts = {"trained": trained_bytes(n_trained, world, fsdp),
             "frozen": (4 * n_policy * has_reference + 4 * (n_policy + n_value) * bool(r) + nbytes * n_reward) / shard
             + nbytes * (num_params(user) if user else 0) + sampling_copy,
             "copy": nbytes * max(n_policy, n_value, n_reward) if fsdp else ddp_copy,
             "KV": kv, "act": act, "logits": logit_bytes(policy, micro, a.max_new_tokens),
             "no-grad logits": logit_bytes(policy, a.micro_batch_size, a.max_new_tokens)}
    phases = (parts["copy"] + kv, (0 if fsdp else ddp_copy) + act + parts["logits"],
              parts["copy"] + parts["no-grad logits"])
    parts["peak"] = parts["trained"] + parts["frozen"] + max(phases)
    parts["sizes"] = {"G": gen, "S": micro, "T": length}
    return parts


def plan(script: str, world: int, args, line: int = 0) -> Row:
    """The Row of one recipe: its components as given, and the peak of the same recipe without --fsdp."""
    fsdp = getattr(args, "fsdp", False)
    parts, ddp = components(script, world, args, fsdp), components(script, world, args, False)
    names = [(args.model, False), (args.reward_model, True), (getattr(args, "user_model", None), False)]
    models = " + ".join(f"{num_params(name, head) / 1e9:.1f}" for name, head in names if name)
    return Row(line, script, world, fsdp, getattr(args, "gradient_checkpointing", False), models,
               parts.pop("sizes"), parts, parts.pop("peak"), ddp["peak"])


def script_args(script: str, argv: list[str], **overrides) -> SimpleNamespace:
    """The script's Args for argv (tyro, as the script parses them, defaults included), with overrides: flags the
    Args may not have yet (fsdp, gradient_checkpointing, generation_batch_size) can be set this way."""
    module = importlib.import_module(script[:-len(".py")])
    return SimpleNamespace(**{**vars(tyro.cli(module.Args, args=argv)), **overrides})


def plan_readme(notes: list | None = None) -> list[Row]:
    """One Row per torchrun RL recipe of README.md; what is skipped, and why, is appended to `notes`."""
    notes = [] if notes is None else notes
    rows, outputs = [], {}  # outputs: --output-dir of an earlier command -> the hub id it was trained from
    for command in test_readme.readme_commands():
        if command.launcher != "torchrun":
            continue
        where = f"README line {command.line}: {command.script}"
        try:
            args = script_args(command.script, command.argv)
        except SystemExit:
            notes.append(f"{where}: tyro rejects the flags; skipped")
            continue
        for name in ("model", "reward_model", "user_model"):
            value = getattr(args, name, None)
            if value:
                setattr(args, name, outputs.get(os.path.normpath(value), value))
        if getattr(args, "output_dir", None):
            outputs[os.path.normpath(args.output_dir)] = args.model
        if command.script not in PPO_FAMILY | PAIRED:
            notes.append(f"{where}: not an RL script, not planned")
            continue
        try:
            rows.append(plan(command.script, command.nproc, args, command.line))
        except UnknownModel as e:
            notes.append(f"{where}: the model {e.args[0]} is not in CONFIGS; skipped")
    return rows


def table(rows: list[Row], limit_gib: float) -> str:
    columns = ["trained", "frozen", "copy", "KV", "act", "logits", "no-grad logits"]
    lines = ["Per-GPU GiB. peak = trained + frozen + max(copy + KV, [DDP: copy] + act + logits, copy + no-grad "
             "logits); G: sequences per generate call, S: sequences per update micro-batch, T: their length "
             "(an upper bound).",
             f"'DDP peak' is the same recipe without --fsdp. Fits: peak <= {limit_gib:g} GiB per GPU.", "",
             "| line | script | params (B) | W | fsdp | gc | G | S | T | " + " | ".join(columns)
             + " | peak | DDP peak | fits |", "|" + " --- |" * (len(columns) + 13)]
    for r in rows:
        cells = [r.line, r.script, r.models, r.world, "yes" if r.fsdp else "no", "yes" if r.checkpointing else "no",
                 r.sizes["G"], r.sizes["S"], r.sizes["T"]] + [f"{r.parts[c] / GIB:.1f}" for c in columns]
        cells += [f"**{r.peak / GIB:.1f}**", f"{r.ddp_peak / GIB:.1f}", "yes" if r.peak <= limit_gib * GIB else "NO"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gib", type=float, default=76.0, help="memory limit per GPU in GiB (default 76)")
    limit = parser.parse_args(argv).gpu_gib
    notes = []
    rows = plan_readme(notes)
    print(table(rows, limit))
    for note in notes:
        print(note)
    return int(any(r.peak > limit * GIB for r in rows))


if __name__ == "__main__":
    sys.exit(main())
