"""Sequence-weighted SFT: every example weighs the same in the loss, however long.

    python examples/sequence_weighted_loss.py --steps 10            # plain PyTorch loop
    python examples/sequence_weighted_loss.py --steps 10 --trainer  # PackedTrainer(loss_weighting="sequence")

The loss of an optimizer step is the mean, over its examples (every micro-batch, every rank), of
each example's mean token loss (`packcollate.objectives.losses`). In a loop: count the step's examples with
`count_loss_examples`, give that count to `sequence_weighted_loss` for every micro-batch, and
multiply by the number of processes (DDP averages gradients over ranks).
"""

import argparse

import torch
from _common import arithmetic_features, tiny_model
from torch.utils.data import DataLoader
from transformers import TrainingArguments

import packcollate  # noqa: F401
from packcollate import PackedCollator, TokenBudgetBatchSampler
from packcollate.integrations import PackedTrainer, micro_batches
from packcollate.objectives.losses import count_loss_examples, sequence_weighted_loss

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
parser.add_argument("--examples", type=int, default=400)
parser.add_argument("--max-tokens", type=int, default=2048, help="token budget of one micro-batch")
parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
parser.add_argument("--trainer", action="store_true", help="use PackedTrainer(loss_weighting='sequence')")
parser.add_argument("--output-dir", default="/tmp/packcollate-sequence-loss")
args = parser.parse_args()

features = arithmetic_features(args.examples)
model = tiny_model()
if args.trainer:
    import datasets

    trainer = PackedTrainer(
        model=model,
        args=TrainingArguments(output_dir=args.output_dir, max_steps=args.steps, learning_rate=1e-3,
                               gradient_accumulation_steps=args.accumulation, logging_steps=max(1, args.steps // 5),
                               save_strategy="no", report_to=[], use_cpu=True),
        train_dataset=datasets.Dataset.from_list(features),
        max_tokens_per_batch=args.max_tokens,
        loss_weighting="sequence",
    )
    print(f"train loss {trainer.train().training_loss:.4f} (mean over examples of each one's mean token loss)")
else:
    sampler = TokenBudgetBatchSampler([len(f["input_ids"]) for f in features], args.max_tokens)
    loader = DataLoader(features, batch_sampler=sampler, collate_fn=PackedCollator(max_seq_length=args.max_tokens))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    step = 0
    while step < args.steps:
        for micro in micro_batches(loader, args.accumulation):
            n_examples = count_loss_examples(micro)  # all micro-batches of the step, all ranks
            step_loss = 0.0
            for batch in micro:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss = sequence_weighted_loss(logits, batch["labels"], batch["cu_seq_lens_q"], n_examples)
                (loss * world_size).backward()
                step_loss += loss.item()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            print(f"step {step}: loss {step_loss:.4f} over {int(n_examples)} examples, {len(micro)} micro-batches")
            if step == args.steps:
                break
