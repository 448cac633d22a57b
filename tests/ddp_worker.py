"""Run by test_rebel.py under torchrun: one REBEL update on a fixed global batch of pairs, split over the ranks.

usage: python -m torch.distributed.run --nproc_per_node N tests/ddp_worker.py MODEL_DIR OUT_FILE [fsdp]
Rank 0 saves the flat parameter vector, the largest difference between any rank's parameters and its own, and
common.all_reduce (sum and mean=True) of (rank + 1, 1). With `fsdp`: FSDP2 (common.wrap(..., fsdp=True)) with
gradient checkpointing, the full parameters gathered from the shards, every rank's local bytes of parameters and
AdamW state, and the model saved by common.save_model to OUT_FILE + ".model".
Then the same update of a LoRA policy (--lora-r 4, same wrapping): its trainable parameters' names and values, its
log-probs of the batch after the update, and the policy saved to OUT_FILE + ".lora" (merged weights + adapter/)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import common  # noqa: E402
import rebel  # noqa: E402

model_dir, out = sys.argv[1:3]
fsdp = sys.argv[3:] == ["fsdp"]
rank, world, device = common.setup(seed=0)
tokenizer = common.load_tokenizer(model_dir)
policy = common.load_model(model_dir, device)

common.SHARED_QUERY_MIN_TOKENS = 0  # these prompts are short: share them anyway, so DDP and FSDP2 run that path

# The same global batch on every rank: 8 prompts of different lengths, two responses each, fixed rewards.
pairs, width = 8, 6
generator = torch.Generator().manual_seed(0)
prompts = [tokenizer("q" * (i + 1))["input_ids"] for i in range(pairs)] * 2
query, query_mask = common.left_pad(prompts, tokenizer.pad_token_id)
responses = torch.randint(10, len(tokenizer), (2 * pairs, width), generator=generator)
responses[torch.arange(2 * pairs), torch.randint(1, width, (2 * pairs,), generator=generator)] = tokenizer.eos_token_id
responses = common.cut_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
mask = common.eos_mask(responses, tokenizer.eos_token_id)
logp_old = common.logprobs(policy, query, query_mask, responses, mask, 0.7, 4).sum(1)
batch = dict(query=query, query_mask=query_mask, responses=responses, mask=mask, logp_old=logp_old,
             rewards=torch.randn(2 * pairs, generator=generator))

# This rank's pairs: rank, rank + W, ... (as common.prompt_batches deals prompts), each with its y'.
mine = torch.arange(rank, pairs, world)
local = {key: value[torch.cat([mine, mine + pairs])] for key, value in batch.items()}

args = rebel.Args(batch_size=pairs, num_passes=2, num_minibatches=1, grad_accum_steps=2, lr=1e-2, temperature=0.7)
policy = common.wrap(policy, device, torch.float32, fsdp=fsdp, gradient_checkpointing=fsdp)
optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
torch.manual_seed(rank)
rebel.update(policy, optimizer, scheduler, local, args, common.precision("float32", device)[1])


def local_bytes(tensors) -> int:
    """Bytes this rank holds of these tensors (its shard of a DTensor)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


shards = {}
if fsdp:
    shards = {"param_bytes": local_bytes(policy.parameters()),
              "adam_bytes": local_bytes(t for state in optimizer.state.values() for t in state.values() if t.dim()),
              "full_param_bytes": sum(p.numel() * p.element_size() for p in policy.parameters())}
    common.save_model(policy, tokenizer, out + ".model")
params = torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().flatten() for p in policy.parameters()])
gathered = [torch.zeros_like(params) for _ in range(world)]
if world > 1:
    dist.all_gather(gathered, params)
else:
    gathered = [params]
local_value = torch.tensor([rank + 1.0, 1.0])
reduced = {"sum": common.all_reduce(local_value), "mean": common.all_reduce(local_value, mean=True),
           "local_after": local_value}
if fsdp:  # every rank's counts, in rank order
    every = [None] * world
    dist.all_gather_object(every, shards)
    shards = {key: [counts[key] for counts in every] for key in shards}

# LoRA: the same update; only the adapters train, pi_ref would be this model with the adapter off.
torch.manual_seed(0)  # the adapters' random A, the same in every run and on every rank
lora = common.load_model(model_dir, device, lora=rebel.Args(lora_r=4))
lora = common.wrap(lora, device, torch.float32, fsdp=fsdp)
optimizer = torch.optim.AdamW(lora.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
torch.manual_seed(rank)
rebel.update(lora, optimizer, scheduler, local, args, common.precision("float32", device)[1])
trained = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
           for name, p in common.unwrap(lora).named_parameters() if p.requires_grad}
lora_logp = common.logprobs(lora, query, query_mask, responses, mask, 0.7, 4)
common.save_model(lora, tokenizer, out + ".lora")
if rank == 0:
    torch.save({"params": params, "rank_diff": max((g - params).abs().max().item() for g in gathered), **reduced,
                **shards, "lora_trained": trained, "lora_logp": lora_logp,
                "batch": {k: batch[k] for k in ("query", "query_mask", "responses", "mask")}}, out)
common.clean_exit()
