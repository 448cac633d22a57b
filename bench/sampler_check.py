"""Is `common.generate` an exact sampler in the scripts' own path? Draws the first token of one prompt many times
(one generate call, the prompt shared by every row: group = the number of draws) and compares the counts with
softmax(logits / T) of a plain forward: Pearson's chi-square over the most likely tokens (those expected 5 times or
more, at most --top) and one bin for the rest.

    python bench/sampler_check.py                     # the embedded model, 3000 draws at T 0.7
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import tyro  # noqa: E402

import common  # noqa: E402


@dataclass
class Args:
    model: str = common.EMBEDDED_MODEL
    """policy whose sampler is checked"""
    prompt: str = "What is 17 + 25? Answer with just the number."
    """the user turn, through the chat template"""
    draws: int = 3000
    """first tokens drawn"""
    temperature: float = 0.7
    """sampling temperature"""
    top: int = 8
    """most likely tokens given a bin of their own"""
    seed: int = 0
    """random seed"""


def main(args: Args):
    model = common.load_model(args.model, torch.device("cpu"))
    tokenizer = common.load_tokenizer(args.model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    query = torch.tensor([list(ids)] * args.draws)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        first = common.generate(model, tokenizer, query, torch.ones_like(query), 1, args.temperature,
                                group=args.draws)[:, 0]
        p = torch.softmax(model(input_ids=query[:1]).logits[0, -1].double() / args.temperature, -1)
    counts = torch.bincount(first, minlength=len(p)).double()
    top = p.argsort(descending=True)[:args.top]
    top = top[p[top] * args.draws >= 5]
    observed = torch.cat([counts[top], (args.draws - counts[top].sum()).view(1)])
    expected = torch.cat([p[top], (1 - p[top].sum()).view(1)]) * args.draws
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    print(f"{args.model}, {args.draws} draws at T {args.temperature}")
    print("p     " + " ".join(f"{x:.4f}" for x in p[top].tolist()))
    print("freq  " + " ".join(f"{x:.4f}" for x in (counts[top] / args.draws).tolist()))
    print(f"chi-square {chi2:.2f} over {len(observed)} bins ({len(observed) - 1} degrees of freedom)")


if __name__ == "__main__":
    main(tyro.cli(Args))
