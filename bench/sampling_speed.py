"""Sampling speed of --generation-backend dynamic (plain generate) and static (preallocated KV cache, compiled
decoding step replayed as a CUDA graph) against the memory-bandwidth bound, and a check that both sample one
distribution.

    python bench/sampling_speed.py                # on a GPU: random-init Pythia-1B, batch 64 and 512, 53 and 1024 tokens
    python bench/sampling_speed.py --tiny         # a tiny model on CPU: the same code, both backends

The policy is held as the scripts hold it: float32 weights under bf16 autocast (--weights bfloat16 for an
inference-style copy). Prompts are --prompt-length random tokens; random models almost never sample EOS, so every
response has its full length. For each (batch, new tokens): dynamic once, then static twice: the first static call
compiles for that shape (its seconds are printed apart), the second is the speed a training run sees from its second
iteration on. tokens/s = batch x new tokens / seconds. The bound: each decoding step reads every weight once in bf16
(2 bytes a parameter; fp32 weights under autocast read more) and the KV cache at its average length, so
tokens/s <= batch x bandwidth / those bytes (bandwidth from gpu_check.PEAKS by the card's name).

Same distribution: with one seed, the share of sequences the two backends sample identically (under autocast the
static backend samples from a bf16 copy of the weights, and a compiled step rounds differently from an eager one, so
a token may flip and the sequence goes its own way after it), and the scorer's (common.logprobs, as the training
scripts compute it) mean per-token log-prob of each backend's samples with its standard error: samples from one
distribution give the same mean within a few standard errors.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import common  # noqa: E402
from gpu_check import CONFIGS, PEAKS, word_tokenizer  # noqa: E402


def timed(fn, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks that the script runs")
    parser.add_argument("--model", default="pythia-1b", choices=sorted(CONFIGS), help="shape of the random model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512], help="sequences per generate call")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[53, 1024], help="tokens sampled per sequence")
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt tokens")
    parser.add_argument("--weights", default="float32", choices=["float32", "bfloat16"],
                        help="the policy's weights (float32 under bf16 autocast: as the training scripts hold it)")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="skip cases that start after this "
                        "many seconds (a lent GPU's time is short)")
    a = parser.parse_args()
    begin = time.perf_counter()
    device = torch.device("cuda") if torch.cuda.is_available() and not a.tiny else torch.device("cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if a.tiny:
        a.model, a.batch_sizes, a.new_tokens, a.prompt_length = "tiny", [4, 8], [8, 16], 16
    config = CONFIGS[a.model]()
    config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, a.weights)).eval().requires_grad_(False)
    tokenizer = word_tokenizer(config.vocab_size)
    params = sum(p.numel() for p in policy.parameters())
    _, amp = common.precision("auto" if device.type == "cuda" else "float32", device)
    bandwidth = next((v[1] for k, v in PEAKS.items() if k in card), float("nan"))
    head_dim = config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    print(f"card: {card}; torch {torch.__version__}; {a.model} ({params / 1e9:.2f}B, random init), {a.weights} "
          f"weights{' under bf16 autocast' if device.type == 'cuda' else ''}; prompts of {a.prompt_length} tokens",
          flush=True)

    def sample(backend, batch, new, seed=0):
        g = torch.Generator().manual_seed(1)
        query = torch.randint(2, config.vocab_size, (batch, a.prompt_length), generator=g).to(device)
        torch.manual_seed(seed)
        with amp():
            return common.generate(policy, tokenizer, query, torch.ones_like(query), new, 1.0, backend=backend), query

    timed(lambda: sample("dynamic", 2, 2), device)  # CUDA context, kernels, allocator
    rows = []
    for new in a.new_tokens:
        for batch in a.batch_sizes:
            if time.perf_counter() - begin > a.deadline:
                print(f"| {batch} | {new} | skipped: past --deadline |", flush=True)
                continue
            kv = 2 * config.num_hidden_layers * kv_heads * head_dim * 2 * batch * (a.prompt_length + new / 2)
            bound = batch * bandwidth / (2 * params + kv)
            row = dict(batch=batch, new=new, bound=bound)
            try:
                (dyn, query), row["dynamic_s"] = timed(lambda: sample("dynamic", batch, new), device)
                (_, _), row["compile_s"] = timed(lambda: sample("static", batch, new), device)
                (sta, _), row["static_s"] = timed(lambda: sample("static", batch, new), device)
                row["identical"] = float((dyn == sta).all(1).float().mean())
                if new == min(a.new_tokens) and batch == min(a.batch_sizes):  # the distribution check, once
                    for name, resp in (("dynamic", dyn), ("static", sta)):
                        mask = common.eos_mask(resp, 0)
                        with amp():
                            lp = common.logprobs(policy, query, torch.ones_like(query), resp, mask, 1.0, 16)
                        per_seq = (lp.sum(1) / mask.sum(1).clamp(min=1)).float()
                        print(f"scorer's mean log-prob per token of {name} samples: {per_seq.mean():.4f} "
                              f"+- {per_seq.std() / len(per_seq) ** 0.5:.4f} (standard error, {len(per_seq)} "
                              f"sequences)", flush=True)
                    del lp
                del dyn, sta, query
            except torch.OutOfMemoryError as e:
                row["error"] = f"out of memory ({str(e).splitlines()[0][:60]})"
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            rows.append(row)
            print(row, flush=True)
    print(f"\n{card}, {a.model}, {a.weights} weights, prompt {a.prompt_length} tokens; tokens/s and share of the "
          f"bandwidth bound")
    print("| batch | new tokens | bound tokens/s | dynamic tokens/s | of bound | static tokens/s | of bound | "
          "static / dynamic | static's first call (compile) s | identical sequences |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['new']} | {r['bound']:.0f} | {r['error']} |")
            continue
        n = r["batch"] * r["new"]
        d, s = n / r["dynamic_s"], n / r["static_s"]
        print(f"| {r['batch']} | {r['new']} | {r['bound']:.0f} | {d:.0f} | {d / r['bound']:.3f} | {s:.0f} | "
              f"{s / r['bound']:.3f} | {s / d:.2f} | {r['compile_s']:.1f} | {r['identical']:.2f} |")


if __name__ == "__main__":
    main()
