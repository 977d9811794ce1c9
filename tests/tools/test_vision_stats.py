"""Text and image token counts of image datasets (`packcollate.tools.vision_stats`), and `packcollate stats` on them."""

import json

import datasets
import numpy as np
import pytest

from packcollate.compat.vision import tiny_vision_config, vision_proof_features
from packcollate.tools.cli import main
from packcollate.tools.vision_stats import (
    placeholder_token_ids,
    processed_counts,
    raw_counts,
)


@pytest.fixture(scope="module")
def config():
    return tiny_vision_config("qwen2_vl")


def processed_rows(config):
    rows = []
    for seed in range(3):
        for f in vision_proof_features(config, seed=seed):
            row = {"input_ids": f["input_ids"]}
            if "image_grid_thw" in f:
                row["image_grid_thw"] = f["image_grid_thw"].tolist()
            rows.append(row)
    return rows


def test_processed_counts_match_a_plain_count(config):
    rows = processed_rows(config)
    total, image = processed_counts(datasets.Dataset.from_list(rows), placeholder_token_ids(config))
    assert total.tolist() == [len(r["input_ids"]) for r in rows]
    assert image.tolist() == [sum(t == config.image_token_id for t in r["input_ids"]) for r in rows]
    expected = [int(np.prod(r["image_grid_thw"], axis=1).sum()) // 4 if "image_grid_thw" in r else 0 for r in rows]
    assert image.tolist() == expected and (image == 0).any() and (image > 0).any()
    list_total, list_image = processed_counts(rows, placeholder_token_ids(config))
    assert np.array_equal(list_total, total) and np.array_equal(list_image, image)


def test_stats_cli_reports_text_and_image_tokens(tmp_path, config, capsys):
    rows = processed_rows(config)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "data"))
    config.save_pretrained(str(tmp_path / "model"))
    assert main(["stats", str(tmp_path / "data"), "--model", str(tmp_path / "model"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = result["image_tokens"]["train"]
    image = sum(sum(t == config.image_token_id for t in r["input_ids"]) for r in rows)
    assert report["image"]["total"] == image
    assert report["text"]["total"] == sum(len(r["input_ids"]) for r in rows) - image
    assert report["examples_with_images"] == sum("image_grid_thw" in r for r in rows)
    assert main(["stats", str(tmp_path / "data"), "--image-token-id", str(config.image_token_id)]) == 0
    assert "image tokens" in capsys.readouterr().out


def test_stats_cli_needs_the_image_token(tmp_path, config):
    datasets.Dataset.from_list(processed_rows(config)).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(ValueError, match="pass --model .* or --image-token-id"):
        main(["stats", str(tmp_path / "data")])


def test_raw_chats_counted_as_trl_processes_them():
    pytest.importorskip("trl")
    from packcollate.tools.toy_vision import image_chats, vision_processor

    processor = vision_processor()
    chats = image_chats(6, seed=2)
    total, image = raw_counts(chats, processor)
    for chat, n, m in zip(chats, total, image):
        grids = processor.image_processor(images=chat["images"])["image_grid_thw"] if chat["images"] else []
        assert m == sum(int(np.prod(g)) // 4 for g in grids)
        assert n > m and (m > 0) == bool(chat["images"])
