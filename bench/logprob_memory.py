"""Peak host memory of one log-prob forward (and forward + backward), chunked log-softmax vs the whole-logits one.

    python bench/logprob_memory.py                      # this checkout vs the last commit before chunking
    python bench/logprob_memory.py --rev HEAD~3 --batch 4 --length 1024

`common.logprobs` used to take float32 log-softmax over the whole [batch, length, vocab] logits at once; now it
runs over chunks of positions (64 MB of float32 each) and recomputes each chunk in the backward pass. The model
here has Llama-3's 128,256-token vocabulary on a 1-layer, 64-wide body, so the logits are almost all of the memory.
Each measurement runs in a fresh process on CPU and reports its peak resident memory (ru_maxrss) above what it held
just before the call, in MiB; the old code is read from the git revision --rev.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE_CHUNKING = "28cdfca"  # the last commit whose common.logprobs took log-softmax over the whole logits


def measure(common_dir: str, batch: int, length: int, backward: bool, dtype: str) -> float:
    """In this process: peak RSS growth (MiB) of one common.logprobs call of the common.py found in common_dir."""
    sys.path.insert(0, common_dir)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import common

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    query = torch.randint(0, config.vocab_size, (batch, 16))
    response = torch.randint(0, config.vocab_size, (batch, length))
    ones = torch.ones_like
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with amp, torch.set_grad_enabled(backward):
        logp = common.logprobs(model, query, ones(query), response, ones(response), 0.7)
    if backward:
        logp.sum().backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default=BEFORE_CHUNKING, help="git revision of the old common.py")
    parser.add_argument("--batch", type=int, default=4, help="sequences in the forward")
    parser.add_argument("--length", type=int, default=512, help="response tokens per sequence")
    parser.add_argument("--measure", nargs=4, metavar=("DIR", "BACKWARD", "DTYPE", "UNUSED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        common_dir, backward, dtype, _ = args.measure
        print(measure(common_dir, args.batch, args.length, backward == "1", dtype))
        return
    old = tempfile.mkdtemp()
    with open(os.path.join(old, "common.py"), "w") as f:
        f.write(subprocess.run(["git", "show", f"{args.rev}:common.py"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout)
    logits_mib = args.batch * (args.length + 1) * 128256 * 4 / 2 ** 20
    print(f"one log-prob call, batch {args.batch} x {args.length} response tokens, vocab 128256 "
          f"(float32 logits: {logits_mib:.0f} MiB); peak RSS growth in MiB, CPU")
    print("| pass | autocast | whole logits (" + args.rev + ") | chunked (this checkout) | ratio |")
    print("|---|---|---|---|---|")
    for backward in ("0", "1"):
        for dtype in ("float32", "bfloat16"):
            peaks = []
            for common_dir in (old, ROOT):
                cmd = [sys.executable, __file__, "--batch", str(args.batch), "--length", str(args.length),
                       "--measure", common_dir, backward, dtype, "-"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
                peaks.append(float(out.stdout.split()[-1]))
            name = "forward + backward" if backward == "1" else "no-grad forward"
            print(f"| {name} | {dtype} | {peaks[0]:.0f} | {peaks[1]:.0f} | {peaks[1] / peaks[0]:.2f} |")


if __name__ == "__main__":
    main()
