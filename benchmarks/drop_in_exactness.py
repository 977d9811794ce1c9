"""The numbers behind the drop-in tests (LoRA, TRL defaults, the plain Trainer's dropped mask), printed.

    python benchmarks/drop_in_exactness.py [--out benchmarks/results]

Same setups as tests/integrations/test_trainer.py, tests/integrations/test_trl.py and tests/integrations/test_preflight.py
(tiny random Llama, CPU, fp32 unless said): the largest relative L2 difference of LoRA adapter
gradients against the padded run, target-token counts, and the bf16 loss difference on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def max_relative(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / a[n].norm()) for n in a)


def lora_numbers(tmp: Path) -> dict:
    from transformers import Trainer

    import tests.integrations.test_trl as test_trl
    from packcollate import PaddedCollator
    from packcollate.integrations import PackedTrainer
    from tests.helpers import (
        adapter_change,
        arguments,
        lora_model,
        prompt_completion_dataset,
    )
    from tests.integrations.test_trl import (
        test_lora_through_packed_sft_trainer_peft_config_equals_padded as sft_test,
    )

    padded = adapter_change(Trainer, tmp, lora_model("sdpa"), args=arguments(tmp / "p", remove_unused_columns=False),
                            train_dataset=prompt_completion_dataset(),
                            data_collator=PaddedCollator(passthrough_keys=["idx"]))
    result = {"adapters": len(padded)}
    for checkpointing in (False, True):
        packed = adapter_change(PackedTrainer, tmp, lora_model(),
                                args=arguments(tmp / f"gc{checkpointing}", gradient_checkpointing=checkpointing),
                                train_dataset=prompt_completion_dataset())
        result[f"PackedTrainer, gradient_checkpointing={checkpointing}"] = max_relative(padded, packed)
    captured = {}
    original = test_trl.assert_same_change
    test_trl.assert_same_change = lambda a, b, rtol=1e-5: captured.update(value=max_relative(a, b))
    try:
        sft_test(tmp / "sft")
    finally:
        test_trl.assert_same_change = original
    result["PackedSFTTrainer(peft_config), TRL default gradient checkpointing, vs SFTTrainer padded"] = captured["value"]
    return result


def label_rule_numbers(tmp: Path) -> dict:
    from trl import SFTTrainer

    from packcollate import PackedCollator
    from packcollate.integrations.trl import PackedSFTTrainer
    from packcollate.tools.toy import char_tokenizer
    from tests.helpers import tiny_chat_model as tiny_model
    from tests.integrations.test_trl import labelled_dataset, sft_config, targets

    dataset = labelled_dataset()
    options = dict(max_length=None, max_steps=1, per_device_train_batch_size=16)
    theirs = SFTTrainer(model=tiny_model(), args=sft_config(tmp, "trl", padding_free=True, **options),
                        train_dataset=dataset, processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_model(), args=sft_config(tmp, "ours", **options), train_dataset=dataset,
                            processing_class=char_tokenizer())
    mask_on_top = PackedCollator()(list(dataset))  # what the collator did with both columns before the fix
    return {"SFTTrainer targets": targets(theirs), "PackedSFTTrainer targets": targets(ours),
            "labels and completion_mask both applied (before)": int((mask_on_top["labels"] != -100).sum())}


def plain_trainer_numbers() -> dict:
    from tests.helpers import prompt_completion_dataset

    dataset = prompt_completion_dataset()
    return {"targets with completion_mask": sum(sum(m[1:]) for m in dataset["completion_mask"]),
            "targets once the mask is dropped (every token)": sum(len(ids) - 1 for ids in dataset["input_ids"])}


def bf16_numbers(tmp: Path) -> dict:
    from trl import SFTTrainer

    from packcollate.integrations.trl import PackedSFTTrainer
    from packcollate.tools.toy import char_tokenizer
    from tests.helpers import losses, prompt_completion
    from tests.helpers import tiny_chat_model as tiny_model
    from tests.integrations.test_trl import sft_config

    options = dict(bf16=True, max_steps=1)
    theirs = SFTTrainer(model=tiny_model(), args=sft_config(tmp, "bf16-trl", **options),
                        train_dataset=prompt_completion(), processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_model(), args=sft_config(tmp, "bf16-ours", padding_free=True, **options),
                            train_dataset=prompt_completion(), processing_class=char_tokenizer())
    reference, packed = losses(theirs)[0], losses(ours)[0]
    return {"SFTTrainer padded loss (bf16 autocast, CPU)": reference, "PackedSFTTrainer loss": packed,
            "relative difference": abs(reference - packed) / abs(reference),
            "mixed_precision": ours.accelerator.mixed_precision}


def main() -> None:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {"lora: max relative adapter-gradient difference vs padded": lora_numbers(tmp),
                  "TRL label rule (dataset with labels and completion_mask)": label_rule_numbers(tmp),
                  "plain Trainer, remove_unused_columns=True": plain_trainer_numbers(),
                  "TRL bf16=True default on CPU (use_cpu=True)": bf16_numbers(tmp)}
    print(json.dumps(result, indent=2))
    out = Path(args.out) / "drop_in_exactness.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/drop_in_exactness.py", "result": result}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
