"""Worker for integrations/test_trainer.py and integrations/test_loss_weighting.py: one PackedTrainer step on
2 ranks, weight change saved by rank 0.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_trainer_step.py OUT.pt [--loss-weighting sequence]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where `tests` is a package
from packcollate.integrations import PackedTrainer  # noqa: E402
from tests.helpers import arguments, prompt_completion_dataset, tiny_model  # noqa: E402
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402


def main(out: str, loss_weighting: str = "token") -> None:
    watchdog()
    dataset = prompt_completion_dataset()
    total = sum(len(x) for x in dataset["input_ids"])
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = arguments(out + ".dir", ddp_backend="gloo", max_steps=-1, num_train_epochs=1,
                     gradient_accumulation_steps=8)
    trainer = PackedTrainer(model=model, args=args, train_dataset=dataset, max_tokens_per_batch=total // 4 + 40,
                            optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None), check_packing=False,
                            loss_weighting=loss_weighting)
    trainer.train()
    assert trainer.state.global_step == 1, trainer.state.global_step
    if trainer.args.process_index == 0:
        torch.save({n: p.detach() - before[n] for n, p in model.named_parameters()}, out)
    exit_now()  # no barrier and no teardown: see two_ranks


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[3:4])  # OUT.pt [--loss-weighting WEIGHTING]
