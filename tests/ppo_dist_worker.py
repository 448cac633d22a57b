"""Worker of test_ppo_distributed.py: one ppo.update on a fixed rollout, in one process or under torchrun.

    python tests/ppo_dist_worker.py MODEL_DIR OUT_DIR                                       # 1 process
    python -m torch.distributed.run --nproc_per_node 2 tests/ppo_dist_worker.py MODEL_DIR OUT_DIR [fsdp]

Every rank builds the same global rollout (fixed generator, no-grad forward on the full batch), keeps rows
rank, rank + W, ... (as common.prompt_batches deals them), computes advantages (whitened over the global batch) and
runs ppo.update (with `fsdp`: policy and value model sharded by FSDP2, with gradient checkpointing). It saves its
advantages and the trained parameters (gathered from the shards under FSDP2) to OUT_DIR/rank{r}.pt."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import common  # noqa: E402
import ppo  # noqa: E402

BATCH, RESPONSE = 8, 6


def fixed_rollout(model, tokenizer, args) -> dict:
    """The same global batch on every rank: random prompts and responses (some end with EOS), their log-probs and
    values under the model, a perturbed reference and random scores."""
    g = torch.Generator().manual_seed(123)
    vocab = len(tokenizer)
    prompts = [torch.randint(4, vocab, (int(n),), generator=g).tolist() for n in torch.randint(3, 8, (BATCH,),
                                                                                                generator=g)]
    query, query_mask = common.left_pad(prompts, tokenizer.pad_token_id)
    responses = torch.randint(4, vocab, (BATCH, RESPONSE), generator=g)
    ends = torch.randint(0, RESPONSE + 3, (BATCH,), generator=g)  # >= RESPONSE: no EOS
    for i, e in enumerate(ends.tolist()):
        if e < RESPONSE:
            responses[i, e] = tokenizer.eos_token_id
    responses = common.cut_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    mask = common.eos_mask(responses, tokenizer.eos_token_id)
    with torch.no_grad():
        logp_old, _, values = model(query, query_mask, responses, mask, args.temperature)
    return dict(query=query, query_mask=query_mask, responses=responses, mask=mask, logp_old=logp_old,
                logp_ref=logp_old - 0.3 * torch.rand(BATCH, RESPONSE, generator=g) * mask, values=values * mask,
                scores=torch.randn(BATCH, generator=g))


def main(model_dir: str, out_dir: str, fsdp: bool = False):
    rank, world, device = common.setup(seed=0)
    args = ppo.Args(model=model_dir, batch_size=BATCH, num_iterations=1, num_ppo_epochs=2, num_minibatches=1,
                    grad_accum_steps=2, lr=1e-2, temperature=0.7, whiten_rewards=True)
    ppo.check_args(args, world)
    tokenizer = common.load_tokenizer(model_dir)
    policy = common.load_model(model_dir, device)
    value = common.load_model(model_dir, device, cls=AutoModelForSequenceClassification, num_labels=1)
    torch.nn.init.normal_(value.score.weight, std=0.5, generator=torch.Generator().manual_seed(7))
    model = ppo.PolicyAndValue(policy, value)
    full = fixed_rollout(model, tokenizer, args)
    batch = {k: v[rank::world] for k, v in full.items()}
    batch |= ppo.advantages_and_returns(batch, args)
    model = common.wrap(model, device, torch.float32, fsdp=fsdp, gradient_checkpointing=fsdp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    scheduler = common.make_scheduler(optimizer, args.lr_schedule, args.warmup_ratio,
                                      args.num_iterations * args.num_ppo_epochs * args.num_minibatches)
    torch.manual_seed(1000 + rank)  # the minibatch order is drawn per rank
    ppo.update(model, optimizer, scheduler, batch, args, common.precision("float32", device)[1])
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"advantages": batch["advantages"], "returns": batch["returns"],
                "params": {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                           for k, v in common.unwrap(model).state_dict().items()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    common.clean_exit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] == ["fsdp"])
