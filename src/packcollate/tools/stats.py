"""`packcollate stats`: how long are the examples of every split, and what would packing save?

    packcollate stats train.jsonl valid.jsonl --batch-size 8 --max-seq-length 2048 --model ./my-model
    packcollate stats ./saved_dataset_dir --tokenizer ./my-model --plot lengths.png

DATA is one or more JSONL or Parquet files (each file is a split, named by its file name), a folder
of such files, or a folder written by `datasets`' `save_to_disk` (every split it holds). Lengths
come from a `length` or `input_ids` column, or from tokenizing `text`, `prompt`+`completion` or
`messages` with `--tokenizer` (a local folder, or a name already in the local Hugging Face cache:
nothing is downloaded). Prints, per split: the length distribution, the padding waste of random
batches of `--batch-size`, the speed-up packing can give, and how many examples exceed
`--max-seq-length`; then a recommended `max_seq_length` covering every split and the model's
context limit (`--model`).

Image datasets (an `images` / `image` column, or processed `pixel_values` / `image_grid_thw`) also
get their text and image token counts per split: processed `input_ids` split by the image
placeholder ids of `--model`'s config (or `--image-token-id`); raw chats with images counted through
`--processor` (a local processor folder), as `PackedSFTTrainer` processes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..batching.lengths import (
    PERCENTILES,
    column_names,
    length_stats,
    recommend_max_seq_length,
    token_counts,
)
from ..compat.configs import (
    config_file,
    context_length,
    context_length_from_json,
    load_local_config,
    read_config_json,
)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
TEXT_FIELDS = ("text", "prompt", "completion", "messages")


def _tqdm(iterable, **kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety
        return iterable
    return tqdm(iterable, disable=None, **kwargs)  # no bar when stderr is not a terminal


class Split(NamedTuple):
    """The rows of one split (a list of dicts from JSONL, or a `datasets.Dataset`), where they come
    from, and `where(i)`: row `i` for error messages (`file: line 7`, or `folder: row 6`)."""

    rows: object
    source: str
    where: Callable[[int], str]


def read_splits(paths: list[str]) -> dict[str, Split]:
    """`{split name: Split}` of every file or folder in `paths`; see the module docstring.

    Raises ValueError naming the file and line of a malformed row (invalid UTF-8 or JSON, not an
    object), or the file that is not Parquet or not a `save_to_disk` folder."""
    splits: dict[str, Split] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"DATA: expected a JSONL/Parquet file or a folder, got {raw!r} (no such path)")
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            splits.update(_load_saved(path))
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
            if not files:
                raise ValueError(f"DATA: expected {DATA_SUFFIXES} files or a save_to_disk folder in {raw!r}, got none")
            for file in files:
                splits[file.stem] = _read_file(file)
        else:
            splits[path.stem] = _read_file(path)
    return splits


def _rows_of(dataset, source: str) -> Split:
    return Split(dataset, source, lambda i: f"{source}: row {i}")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _read_file(path: Path) -> Split:
    if path.suffix == ".parquet":
        try:
            import datasets
            import pyarrow.parquet
        except ImportError as error:
            raise ImportError("reading Parquet needs the datasets extra: pip install 'packcollate[datasets]'") from error
        try:
            pyarrow.parquet.read_schema(str(path))  # before datasets, which logs its own error for a bad file
            return _rows_of(datasets.Dataset.from_parquet(str(path)), str(path))
        except Exception as error:  # noqa: BLE001 - ArrowInvalid, OSError, …: one line naming the file
            raise ValueError(f"{path}: expected a Parquet file, got {_first_line(error)}") from None
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"DATA: expected a file ending in {DATA_SUFFIXES}, got {str(path)!r}")
    rows, lines = [], []
    with path.open("rb") as f:
        for number, raw in enumerate(_tqdm(f, desc=f"reading {path.name}", unit=" lines", leave=False), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}: line {number}: expected UTF-8 text, got the byte 0x{raw[error.start]:02x} "
                                 f"at column {error.start + 1}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: expected one JSON object per line, got {error}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number}: expected one JSON object per line, got {_kind(row)}")
            rows.append(row)
            lines.append(number)
    return Split(rows, str(path), lambda i: f"{path}: line {lines[i]}")


def _kind(value) -> str:
    """`a JSON array`, `a JSON number`, … for error messages."""
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return f"a JSON {names.get(type(value), type(value).__name__)} {json.dumps(value)[:40]}"


def _load_saved(path: Path) -> dict[str, Split]:
    try:
        import datasets
    except ImportError as error:
        raise ImportError("reading a save_to_disk folder needs the datasets extra: pip install 'packcollate[datasets]'") from error
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001 - a fake or damaged folder: one line naming it
        raise ValueError(f"{path}: expected a folder written by datasets' save_to_disk, got {_first_line(error)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return {name: _rows_of(split, f"{path}/{name}") for name, split in loaded.items()}
    return {path.name: _rows_of(loaded, str(path))}


def _chat_ids(tokenizer, conversations: list) -> list[list[int]]:
    """Token ids of each conversation through the tokenizer's chat template."""
    return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)["input_ids"]


def split_lengths(rows, tokenizer=None, name: str = "", chunk: int = 1000, where=None) -> np.ndarray:
    """`(n,)` int64 token count of each example of a split; see the module docstring for the sources.

    `where(i)` names row `i` in errors (see `lengths.token_counts`)."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)  # reported by the caller, with every empty split named
    counts = token_counts(rows, where=where)
    if counts is not None:
        return counts
    columns = column_names(rows)
    present = [field for field in TEXT_FIELDS if field in columns]
    if not present:
        raise ValueError(
            f"split {name!r}: expected a 'length' or 'input_ids' column, or text in {TEXT_FIELDS}, got columns {columns}"
        )
    if tokenizer is None:
        raise ValueError(
            f"split {name!r}: its examples are text ({present}); pass --tokenizer PATH to count their tokens"
        )
    if not hasattr(rows, "column_names"):
        _check_text_rows(rows, present, where or (lambda i: f"split {name!r}: row {i}"))
    lengths = []
    n = len(rows)
    for start in _tqdm(range(0, n, chunk), desc=f"tokenizing {name}", unit=" chunks", leave=False):
        part = rows[start : start + chunk] if hasattr(rows, "column_names") else None
        get = (lambda key: part[key]) if part is not None else (lambda key: [r[key] for r in rows[start : start + chunk]])
        if "messages" in present:
            ids = _chat_ids(tokenizer, get("messages"))
        elif "prompt" in present and "completion" in present:
            prompts, completions = get("prompt"), get("completion")
            if prompts and isinstance(prompts[0], list):  # TRL's conversational prompt/completion
                ids = _chat_ids(tokenizer, [p + c for p, c in zip(prompts, completions)])
            else:
                ids = [p + c for p, c in zip(tokenizer(prompts)["input_ids"],
                                             tokenizer(completions, add_special_tokens=False)["input_ids"])]
        else:
            ids = tokenizer(get(present[0]))["input_ids"]
        lengths.extend(len(x) for x in ids)
    return np.asarray(lengths, dtype=np.int64)


def _image_counts(splits: dict, args) -> dict:
    """`{split: ((n,) total, (n,) image tokens)}` for the image splits (empty when there are none)."""
    from .vision_stats import (
        is_image_split,
        placeholder_token_ids,
        processed_counts,
        raw_counts,
    )

    image_splits = {name: split.rows for name, split in splits.items()
                    if len(split.rows) and is_image_split(column_names(split.rows))}
    if not image_splits:
        return {}
    ids = list(args.image_token_id or [])
    if not ids and args.model:
        ids = placeholder_token_ids(_model_config(args.model, args.trust_remote_code))
    counts = {}
    for name, rows in image_splits.items():
        if "input_ids" in column_names(rows):
            if not ids:
                raise ValueError(f"split {name!r}: image data with input_ids: pass --model (its config names the image "
                                 f"token) or --image-token-id to count image tokens")
            counts[name] = processed_counts(rows, ids)
        else:
            if args.processor is None:
                raise ValueError(f"split {name!r}: raw chats with images: pass --processor PATH to count their tokens")
            counts[name] = raw_counts(rows, _load_processor(args.processor, args.trust_remote_code), ids)
    return counts


def _load_processor(name: str, trust_remote_code: bool = False):
    """A local processor; its folder's code runs only with `trust_remote_code` (passed explicitly)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name, local_files_only=True, trust_remote_code=bool(trust_remote_code))
    except OSError as error:
        raise ValueError(f"--processor: expected a local folder or a name in the local Hugging Face cache, got {name!r} "
                         f"({error.__class__.__name__}); nothing is downloaded") from None


def _check_text_rows(rows: list, present: list[str], where) -> None:
    """Every row carries the text fields the tokenizer reads, as strings (or lists of chat messages)."""
    fields = ["messages"] if "messages" in present else (
        ["prompt", "completion"] if {"prompt", "completion"} <= set(present) else present[:1])
    allowed = (list,) if fields == ["messages"] else (str, list)
    for i, row in enumerate(rows):  # per row, not per token
        for field in fields:
            if field not in row:
                raise ValueError(f"{where(i)}: expected key {field!r} (as in the first row), got keys {sorted(row)}")
            if not isinstance(row[field], allowed):
                raise ValueError(f"{where(i)}: key {field!r}: expected text, got {type(row[field]).__name__} "
                                 f"{json.dumps(row[field])[:40]}")


def _load_tokenizer(name: str | None, trust_remote_code: bool = False):
    """A local tokenizer; its folder's code runs only with `trust_remote_code` (passed explicitly, so
    transformers never asks on a terminal)."""
    if name is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=bool(trust_remote_code))
    except OSError as error:
        raise ValueError(f"--tokenizer: expected a local folder or a name in the local Hugging Face cache, got {name!r} "
                         f"({error.__class__.__name__}); nothing is downloaded") from None


def _model_config(name: str, trust_remote_code: bool):
    """`--model`'s config: a local folder or config.json (checked as data first), or a cached model."""
    if config_file(name) is not None:
        return load_local_config(name, trust_remote_code=trust_remote_code)
    from transformers import AutoConfig

    if Path(name).is_dir() or Path(name).suffix == ".json":
        read_config_json(name)  # a folder without config.json, or no such file: the error names it
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError) as error:
        raise ValueError(f"--model: expected a local folder, a config.json or a cached model, got {name!r} "
                         f"({error.__class__.__name__}: {str(error).splitlines()[0]})") from None


def _model_context(name: str | None, trust_remote_code: bool) -> tuple[int | None, str]:
    if name is None:
        return None, "not given (--model)"
    if config_file(name) is not None:
        # a local config.json is data: read it without running code (remote-code configs need no trust here);
        # transformers' own config class is asked only for a default the file leaves out
        data = read_config_json(name)
        limit, key = context_length_from_json(data)
        if limit or data.get("auto_map"):
            return limit, (f"{limit} ({key} in config.json)" if limit else "unknown (no context length in config.json)")
    config = _model_config(name, trust_remote_code)
    limit, key = context_length(config)
    return limit, (f"{limit} ({key} of {type(config).__name__})" if limit else "unknown (no context length in config)")


def report(lengths: dict, batch_size: int, max_seq_length: int | None, context_limit: int | None) -> dict:
    """Per-split statistics of `{split: (n,) lengths}` and the recommendation, as a JSON-ready dict."""
    stats = {name: length_stats(split, batch_size, max_seq_length) for name, split in lengths.items()}
    if len(lengths) > 1:
        stats["all splits"] = length_stats(np.concatenate(list(lengths.values())), batch_size, max_seq_length)
    recommended = recommend_max_seq_length(lengths, context_limit)
    return {
        "batch_size": batch_size,
        "max_seq_length": max_seq_length,
        "context_limit": context_limit,
        "recommended_max_seq_length": recommended,
        "over_recommended": {name: int((split > recommended).sum()) for name, split in lengths.items()},
        "splits": {name: {**vars(s), "padding_waste": s.padding_waste, "packed_speedup": s.packed_speedup}
                   for name, s in stats.items()},
    }


def format_report(result: dict, context_text: str) -> str:
    n = result["max_seq_length"]
    header = (f"{'split':14} {'examples':>9} {'min':>6} " + " ".join(f"{'p' + str(p):>6}" for p in PERCENTILES)
              + f" {'max':>7} {'mean':>8} {'> ' + str(n) if n else '':>8} {'pad waste@' + str(result['batch_size']):>13}"
              f" {'packed':>8}")
    lines = [header]
    for name, s in result["splits"].items():
        lines.append(
            f"{name[:14]:14} {s['count']:9d} {s['min']:6d} " + " ".join(f"{s['percentiles'][p]:6d}" for p in PERCENTILES)
            + f" {s['max']:7d} {s['mean']:8.1f} {(str(s['over']) if n else ''):>8} {s['padding_waste']:12.1%}"
            f" {s['packed_speedup']:7.2f}x"
        )
    lines.append("")
    lines.append(f"padded: random batches of {result['batch_size']} padded to their longest example; "
                 f"packed: the speed-up packing can give (padded tokens / real tokens)")
    recommended = result["recommended_max_seq_length"]
    over = {k: v for k, v in result["over_recommended"].items() if v}
    lines.append(f"recommended max_seq_length: {recommended} (longest example of every split + 5%, multiple of 64"
                 + (f"; capped at the context limit: {over} examples are longer, handled by the collator's overflow policy)"
                    if over else ")"))
    lines.append("  with packing it bounds each example, not the packed row; validation splits count too")
    lines.append(f"model context limit: {context_text}")
    if result["context_limit"] and n and n > result["context_limit"]:
        lines.append(f"  warning: --max-seq-length {n} is longer than the model's context limit {result['context_limit']}")
    return "\n".join(lines)


def plot(splits: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install 'packcollate[bench]'") from error
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(int(np.max(v)) for v in splits.values())
    bins = np.linspace(0, top, 60)
    for name, lengths in splits.items():
        ax.hist(lengths, bins=bins, alpha=0.5, label=f"{name} ({len(lengths)})")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    ax.set_title("example lengths per split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", metavar="DATA", help="JSONL/Parquet files, or folders of them, or save_to_disk folders")
    parser.add_argument("--split", action="append", help="only these splits (repeatable); default: every split")
    parser.add_argument("--max-seq-length", type=int, default=None, help="count the examples longer than this")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size for the padding waste (default 8)")
    parser.add_argument("--model", default=None, help="model folder or config.json: report its context limit")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or cached name, for text data")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the code of --model's config and --tokenizer's folder to run (off by default)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write a histogram of the lengths")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--processor", default=None, help="processor folder or cached name, for raw image chats")
    parser.add_argument("--image-token-id", type=int, action="append", default=None,
                        help="image placeholder token id of processed image data (repeatable; default: --model's)")


def _check_options(args: argparse.Namespace) -> None:
    for flag, value in (("--batch-size", args.batch_size), ("--max-seq-length", args.max_seq_length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected a positive int, got {value}")


def main(args: argparse.Namespace) -> int:
    _check_options(args)
    splits = read_splits(args.data)
    if args.split:
        missing = sorted(set(args.split) - set(splits))
        if missing:
            raise ValueError(f"--split: expected names among {sorted(splits)}, got {missing}")
        splits = {name: splits[name] for name in args.split}
    tokenizer = _load_tokenizer(args.tokenizer, args.trust_remote_code)
    image_counts = _image_counts(splits, args)
    lengths = {name: image_counts[name][0] if name in image_counts
               else split_lengths(split.rows, tokenizer, name, where=split.where)
               for name, split in splits.items()}
    empty = [name for name, values in lengths.items() if values.size == 0]
    if empty:
        raise ValueError(f"DATA: expected examples in every split, got none in {empty} "
                         f"({', '.join(splits[name].source for name in empty)})")
    context_limit, context_text = _model_context(args.model, args.trust_remote_code)
    result = report(lengths, args.batch_size, args.max_seq_length, context_limit)
    if image_counts:
        from .vision_stats import format_image_report, image_report

        result["image_tokens"] = image_report(image_counts)
    print(json.dumps(result, indent=2) if args.json else format_report(result, context_text))
    if image_counts and not args.json:
        print("\n" + format_image_report(result["image_tokens"]))
    if args.plot:
        plot(lengths, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0
