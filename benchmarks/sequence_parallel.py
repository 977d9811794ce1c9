"""Sequence parallelism over packed rows: per-rank activation memory and step time, one process vs 2 ranks.

    torchrun --nproc_per_node 2 benchmarks/sequence_parallel.py                 # CPU, gloo, fp32
    torchrun --nproc_per_node 2 benchmarks/sequence_parallel.py --lengths 2048 4096 8192 16384

For each packed-row length (examples of `--example-length` tokens, the last one shorter), side by side:
- `one process`: rank 0 runs the whole row alone (forward + backward + AdamW) while rank 1 waits;
- `2 ranks`: each rank runs its shard (`shard_packed_batch`, `sequence_parallel_forward`,
  `sequence_parallel_loss`), attention over the whole row by Ulysses exchanges (gloo on CPU).

Memory: the bytes autograd keeps for backward during the forward (`torch.autograd.graph.saved_tensors_hooks`,
each storage counted once) on the rank that holds most: the activations, which grow with the row and which
sequence parallelism splits; weights, gradients and optimizer state (not split here: every rank holds a
replica) are reported apart. The CPU allocator has no per-step peak counter (`ru_maxrss` only grows), hence
this measure; on CUDA the script also reports `torch.cuda.max_memory_allocated`.
Time: the median of `--repeats` steps after one warm-up step, on the slowest rank. Each rank runs one thread
(`OMP_NUM_THREADS`): the one-process run uses one core and the 2 ranks two, so on CPU the time ratio is a
second core's work minus what the exchanges cost, not a like-for-like speed-up.
Model: Llama-shaped, 4 layers, hidden 256, 8 heads, 2 key/value heads, vocabulary 4096 (the `tiny` preset of
`packcollate bench`). Writes `benchmarks/results/sequence_parallel/<device>.json` (+ a plot with matplotlib).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import _common as common
import numpy as np
import torch
import torch.distributed as dist

import packcollate  # noqa: F401  (registers the backend)
from packcollate import PackedCollator
from packcollate.integrations import join_torchrun
from packcollate.integrations.sequence_parallel import (
    prepare_sequence_parallel,
    sequence_parallel_forward,
    sequence_parallel_loss,
    shard_packed_batch,
)
from packcollate.tools.bench import library_versions, save_result

RESULTS = Path(__file__).parent / "results" / "sequence_parallel"


def build_model(vocab: int, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 16, use_cache=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="packcollate").to(device)


def packed_row(length: int, example_length: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + length)
    sizes = [example_length] * (length // example_length) + ([length % example_length] if length % example_length else [])
    return PackedCollator()([{"input_ids": rng.integers(3, vocab, n).tolist()} for n in sizes])


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the block, each storage counted once, the
    model's parameters (saved by every linear layer, and not activations) left out."""

    def __init__(self, model):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def step(model, optimizer, forward_and_loss, device) -> tuple[float, int, int]:
    """One training step: (seconds, saved activation bytes, CUDA peak bytes or 0)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with SavedBytes(model) as saved:
        loss = forward_and_loss()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return time.perf_counter() - start, saved.total, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--example-length", type=int, default=1000)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rank, world, device = join_torchrun("benchmarks/sequence_parallel.py")
    cuda = device.type == "cuda"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    model = build_model(args.vocab, device)
    prepare_sequence_parallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for length in args.lengths:
        row = common.to_device(packed_row(length, args.example_length, args.vocab), device)
        measured = {}
        if rank == 0:  # one process, the whole row
            runs = [step(model, optimizer, lambda row=row: model(**row).loss, device) for _ in range(args.repeats + 1)][1:]
            measured["one"] = runs
        dist.barrier()
        shard = shard_packed_batch(row)

        def split_step(shard=shard):
            logits = sequence_parallel_forward(model, shard).logits
            return sequence_parallel_loss(logits, shard) * world

        runs = [step(model, optimizer, split_step, device) for _ in range(args.repeats + 1)][1:]
        # the rank that holds most: the largest saved bytes and the slowest step
        mine = torch.tensor([max(r[1] for r in runs), max(r[2] for r in runs), float(np.median([r[0] for r in runs]))],
                            dtype=torch.float64, device=device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        if rank == 0:
            one_time = float(np.median([r[0] for r in measured["one"]]))
            one_saved = max(r[1] for r in measured["one"])
            entry = {"length": length, "examples": len(row["cu_seq_lens_q"]) - 1, "shard_tokens": list(shard["sequence_shard"].lengths),
                     "one_process": {"activation_bytes": one_saved, "step_s": one_time,
                                     "cuda_peak_bytes": max(r[2] for r in measured["one"])},
                     f"{world}_ranks": {"activation_bytes_per_rank": int(mine[0]), "step_s": float(mine[2]),
                                        "cuda_peak_bytes_per_rank": int(mine[1])}}
            entry["activation_ratio"] = entry[f"{world}_ranks"]["activation_bytes_per_rank"] / one_saved
            entry["time_ratio"] = float(mine[2]) / one_time
            rows.append(entry)
            print(f"  length {length}: done", flush=True)
        dist.barrier()

    if rank == 0:
        mb = 1 << 20
        print(f"\nsequence parallelism, {device.type}, fp32, weights {weights / mb:.1f} MB per rank (replicated), "
              f"{world} ranks")
        print(f"{'row tokens':>10} {'one process MB':>15} {f'{world} ranks MB/rank':>16} {'ratio':>6} "
              f"{'one process s':>14} {f'{world} ranks s':>11} {'ratio':>6}")
        for e in rows:
            split = e[f"{world}_ranks"]
            print(f"{e['length']:>10} {e['one_process']['activation_bytes'] / mb:>15.1f} "
                  f"{split['activation_bytes_per_rank'] / mb:>16.1f} {e['activation_ratio']:>6.2f} "
                  f"{e['one_process']['step_s']:>14.3f} {split['step_s']:>11.3f} {e['time_ratio']:>6.2f}")
        result = {"benchmark": "sequence_parallel", "device": device.type, "ranks": world, "weights_bytes": weights,
                  "example_length": args.example_length, "repeats": args.repeats, "machine": platform.machine(),
                  "cpu_count": os.cpu_count(), "versions": library_versions(), "rows": rows}
        name = torch.cuda.get_device_name().replace(" ", "_") if cuda else f"cpu-{platform.machine()}"
        save_result(result, RESULTS / f"{name}.json")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            pass
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
            lengths = [e["length"] for e in rows]
            ax.plot(lengths, [e["one_process"]["activation_bytes"] / mb for e in rows], "o-", label="one process")
            ax.plot(lengths, [e[f"{world}_ranks"]["activation_bytes_per_rank"] / mb for e in rows], "s-",
                    label=f"{world} sequence-parallel ranks (per rank)")
            ax.set_xlabel("packed row (tokens)")
            ax.set_ylabel("activations saved for backward (MB)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(RESULTS / f"{name}.png", dpi=100)
            print(f"wrote {RESULTS / f'{name}.png'}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
