"""One REBEL and one PPO iteration on one GPU, random-init models built from real configs, at the paper's lengths.

    python bench/gpu_check.py                 # on a GPU: Pythia-1B, Pythia-2.8B and a Llama-3-8B-shaped model
    python bench/gpu_check.py --tiny          # the same code on CPU with a tiny model (checks the script runs)

Nothing is downloaded: each model is `from_config` (random weights) with Pythia's / Llama-3's shapes, and the
tokenizer is a word-level one over the model's vocabulary, so random models almost never sample EOS and every
response has exactly --max-new-tokens tokens. Prompts are --prompt-length random tokens (TL;DR-sized by default),
rewards a fixed function of the response text. Each run uses the scripts' own `rollout` and `update` (REBEL: two
responses per prompt, one pass; PPO: policy + value model, one epoch), with bf16 autocast over fp32 weights, as
`--dtype auto` does on a GPU, and gradient checkpointing. Per run it prints:
  - seconds for the rollout and the update, and peak GPU memory (torch.cuda.max_memory_allocated);
  - generation tokens/s, and the bound memory bandwidth puts on it: every decoding step reads the weights at least
    once in bf16 (2 bytes a parameter) plus the KV cache so far, so tokens/s <= batch x bandwidth / those bytes;
  - the update's model FLOPs utilisation: 6 x parameters x tokens through the update (forward + backward, not
    counting checkpointing's recomputation), over the update's time and the card's dense bf16 peak.
What does not fit one card is skipped with the reason: PPO at 2.8B trains two 2.8B models (16 bytes a parameter
each: 90 GB), and at 8B only sampling and a no-grad log-prob pass run (an 8B update needs --fsdp over several GPUs).
Card figures (peak bf16 dense FLOP/s, memory bandwidth) come from PEAKS by the device name.
"""

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPTNeoXConfig,  # noqa: E402
                          LlamaConfig, PreTrainedTokenizerFast)

import common  # noqa: E402
import ppo  # noqa: E402
import rebel  # noqa: E402

PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}  # FLOP/s, bytes/s
CONFIGS = {
    "pythia-1b": lambda: GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=16,
                                       num_attention_heads=8, intermediate_size=8192, rotary_pct=0.25),
    "pythia-2.8b": lambda: GPTNeoXConfig(vocab_size=50304, hidden_size=2560, num_hidden_layers=32,
                                         num_attention_heads=32, intermediate_size=10240, rotary_pct=0.25),
    "llama-3-8b": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                                      rope_theta=500000.0),
    "tiny": lambda: LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=128),
}
# (model, algorithm, what runs): the update of PPO at 2.8B and of anything at 8B does not fit one 80 GB card.
PLAN = [("pythia-1b", "rebel", "full"), ("pythia-1b", "ppo", "full"), ("pythia-2.8b", "rebel", "full"),
        ("pythia-2.8b", "ppo", "skip: policy + value model in training need 90 GB"),
        ("llama-3-8b", "rebel", "rollout")]


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer whose every id is a word "t<id>"; id 0 is EOS and padding."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t0", pad_token="t0", unk_token="t1")


def build(name: str, device, value: bool, dtype: torch.dtype):
    """Policy, reference (the same weights) and, for PPO, a value model, randomly initialised on the device."""
    config = CONFIGS[name]()
    config.eos_token_id = config.pad_token_id = 0
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        reference = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
        reference.load_state_dict(policy.state_dict())
        critic = None
        if value:
            config.num_labels = 1
            critic = AutoModelForSequenceClassification.from_config(config, dtype=dtype).eval()
    return config, policy, reference, critic


def run(name: str, algorithm: str, what: str, a, device) -> dict:
    # fp32 weights to train (as the scripts); bf16 weights where only sampling runs (an 8B fp32 pair is 64 GB)
    weights = torch.float32 if what == "full" else torch.bfloat16
    config, policy, reference, critic = build(name, device, algorithm == "ppo", weights)

    def score(rows, completions):
        """A fixed, cheap reward of the text: how many of its words end in 7, over 10."""
        return torch.tensor([sum(w.endswith("7") for w in c.split()) / 10 for c in completions], device=device)
    params = sum(p.numel() for p in policy.parameters())
    tokenizer = word_tokenizer(config.vocab_size)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": "", "prompt_text": "", "reference_ids": [],
             "input_ids": torch.randint(2, config.vocab_size, (a.prompt_length,), generator=g).tolist()}
            for _ in range(a.batch_size)]
    dtype, amp = common.precision("auto" if device.type == "cuda" else "float32", device)
    shared = dict(batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, micro_batch_size=a.micro_batch_size,
                  generation_batch_size=a.generation_batch_size, gradient_checkpointing=True, temperature=0.7,
                  num_minibatches=1, grad_accum_steps=a.grad_accum_steps, eos_penalty=None)
    if algorithm == "rebel":
        args = rebel.Args(num_passes=1, **shared)
        model = common.wrap(policy, device, dtype, gradient_checkpointing=True)
    else:
        args = ppo.Args(num_ppo_epochs=1, **shared)
        model = common.wrap(ppo.PolicyAndValue(policy, critic), device, dtype, gradient_checkpointing=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    scheduler = common.make_scheduler(optimizer, "constant", 0.0, 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    module = rebel if algorithm == "rebel" else ppo
    for _ in range(a.warmup):  # untimed: kernel loading, the caching allocator's growth, compiling (static backend)
        warm = module.rollout(model, reference, tokenizer, rows, score, args, amp)
        if what == "full":
            module.update(model, optimizer, scheduler, warm | (ppo.advantages_and_returns(warm, args)
                                                              if algorithm == "ppo" else {}), args, amp)
        del warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    batch = module.rollout(model, reference, tokenizer, rows, score, args, amp)
    sync()
    rollout_s = time.perf_counter() - start
    sequences = a.batch_size * (2 if algorithm == "rebel" else 1)
    # generation alone, timed again on its own for the tokens/s (the rollout also holds the log-prob passes)
    query, query_mask = common.left_pad([r["input_ids"] for r in rows], 0, device)
    query, query_mask = query.repeat(sequences // a.batch_size, 1), query_mask.repeat(sequences // a.batch_size, 1)
    start = time.perf_counter()
    with amp():
        responses = common.generate(common.unwrap(model) if algorithm == "rebel" else common.unwrap(model).policy,
                                    tokenizer, query, query_mask, a.max_new_tokens, 0.7, a.generation_batch_size)
    sync()
    generate_s = time.perf_counter() - start
    new_tokens = int((responses != 0).sum())
    result = dict(model=name, algorithm=algorithm, params=params, rollout_s=rollout_s, generate_s=generate_s,
                  tokens_per_s=new_tokens / generate_s, update_s=float("nan"), mfu=float("nan"))
    if what == "full":
        if algorithm == "ppo":
            batch |= ppo.advantages_and_returns(batch, args)
        sync()
        start = time.perf_counter()
        module.update(model, optimizer, scheduler, batch, args, amp)
        sync()
        result["update_s"] = time.perf_counter() - start
        trained = sum(p.numel() for p in model.parameters())
        flops = 6 * trained * sequences * (a.prompt_length + a.max_new_tokens)
        peak_flops = next((v[0] for k, v in PEAKS.items() if k in a.card), float("nan"))
        result["mfu"] = flops / result["update_s"] / peak_flops
    # bandwidth bound on decoding: bf16 weights once per step, plus the KV cache at the average length
    head_dim = config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    g_batch = min(a.generation_batch_size or sequences, sequences)
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * 2 * g_batch * (a.prompt_length + a.max_new_tokens / 2)
    bandwidth = next((v[1] for k, v in PEAKS.items() if k in a.card), float("nan"))
    result["bound_tokens_per_s"] = g_batch * bandwidth / (2 * params + kv)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    del model, reference, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks that the script runs")
    parser.add_argument("--only", nargs="*", default=None, help="model names of PLAN to run (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per iteration")
    parser.add_argument("--prompt-length", type=int, default=512, help="prompt tokens (TL;DR: up to 512)")
    parser.add_argument("--max-new-tokens", type=int, default=53, help="response tokens (TL;DR: 53)")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="sequences per no-grad forward")
    parser.add_argument("--generation-batch-size", type=int, default=None, help="sequences per generate call")
    parser.add_argument("--grad-accum-steps", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--warmup", type=int, default=0, help="untimed iterations before the timed one (the README's "
                        "table: 0, so the first model's iteration carries the process's warm-up)")
    parser.add_argument("--generation-backend", default="dynamic", choices=["auto", "dynamic", "static"],
                        help="how to sample (dynamic by default: static compiles once per model and shape, ~1 min "
                        "each; bench/sampling_speed.py compares the two)")
    a = parser.parse_args()
    common.GENERATION_BACKEND = a.generation_backend
    device = torch.device("cuda") if torch.cuda.is_available() and not a.tiny else torch.device("cpu")
    a.card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    plan = [("tiny", "rebel", "full"), ("tiny", "ppo", "full")] if a.tiny else PLAN
    if a.tiny:
        a.batch_size, a.prompt_length, a.max_new_tokens, a.micro_batch_size, a.grad_accum_steps = 4, 16, 8, 4, 2
    print(f"card: {a.card}; torch {torch.__version__}; batch {a.batch_size} prompts x {a.prompt_length} tokens, "
          f"{a.max_new_tokens} new tokens; bf16 autocast over fp32 weights; gradient checkpointing; "
          f"{a.generation_backend} sampling")
    print("| model | algorithm | params | rollout s | update s | peak GiB | gen tokens/s | bandwidth bound | "
          "of bound | update MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, algorithm, what in plan:
        if a.only is not None and name not in a.only:
            continue
        if what.startswith("skip"):
            print(f"| {name} | {algorithm} | | {what} | | | | | | |")
            continue
        torch.manual_seed(0)
        try:
            r = run(name, algorithm, what, a, device)
        except (torch.OutOfMemoryError, RuntimeError) as e:  # say so, and go on with the next row
            print(f"| {name} | {algorithm} | | failed: {str(e).splitlines()[0][:100]} | | | | | | |", flush=True)
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
            continue
        print(f"| {name} | {algorithm} | {r['params'] / 1e9:.2f}B | {r['rollout_s']:.1f} | {r['update_s']:.1f} | "
              f"{r['peak_gib']:.1f} | {r['tokens_per_s']:.0f} | {r['bound_tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / r['bound_tokens_per_s']:.2f} | {r['mfu']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
