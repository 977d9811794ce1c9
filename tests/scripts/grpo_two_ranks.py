"""Worker for integrations/test_trl_rl.py: TRL's padded GRPOTrainer (or RLOOTrainer), the packed trainer and the
packed trainer with a token budget, one after the other on the same 2 ranks (gloo, CPU); rank 0 saves
each run's completions, logged history and parameter changes.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/grpo_two_ranks.py OUT.pt LOSS_TYPE|rloo
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where `tests` is a package
from trl import GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from packcollate.integrations.trl import PackedGRPOTrainer, PackedRLOOTrainer  # noqa: E402
from tests.integrations.test_trl_rl import trained  # noqa: E402
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402

BUDGET = 50


def main(out: str, loss_type: str) -> None:
    watchdog(240)
    torch.set_num_threads(1)
    root = Path(out + ".dir")
    options = dict(ddp_backend="gloo", dtype=torch.float64, per_device_train_batch_size=4, steps_per_generation=1)
    if loss_type == "rloo":
        theirs, ours = RLOOTrainer, PackedRLOOTrainer
        options.update(config_cls=RLOOConfig, beta=0.0)
    else:
        theirs, ours = GRPOTrainer, PackedGRPOTrainer
        options.update(loss_type=loss_type)
    runs = {}
    for name, cls, attn, budget in (("trl", theirs, "sdpa", None), ("packed", ours, "packcollate", None),
                                    ("budget", ours, "packcollate", BUDGET)):
        forwards = []
        trainer, before, after = trained(cls, attn, root / name, budget=budget, on_forward=forwards.append, **options)
        assert trainer.accelerator.num_processes == 2
        runs[name] = {"completions": list(trainer._logs["completion"]), "history": trainer.state.log_history,
                      "before": before, "after": after, "forwards": forwards}
    if torch.distributed.get_rank() == 0:
        torch.save(runs, out)
    exit_now()  # no barrier and no teardown: see two_ranks


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
