"""Configs that name remote code (`auto_map`, e.g. ChatGLM2's `configuration_chatglm.ChatGLMConfig`):
say what is needed in one line instead of transformers' message or a traceback.

`config.json` is read as data (`compat.configs.read_config_json`): nothing runs before the user passes
`--trust-remote-code` (`trust_remote_code=True`), and then only the `.py` files beside the config
(nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .configs import read_config_json

#: `auto_map` entries whose code `packcollate check` runs: the config class and the causal LM.
CHECKED_AUTO_CLASSES = ("AutoConfig", "AutoModelForCausalLM")


def remote_code_files(config: dict) -> list[str]:
    """The `.py` files (relative to the config's folder) that `config`'s `auto_map` names for
    `CHECKED_AUTO_CLASSES`, in order; `[]` when it names none. An entry `"repo--module.Class"` names
    another repository's module: its file is `module.py` there, listed as `repo/module.py`."""
    auto_map = config.get("auto_map") or {}
    files = []
    for auto_class in CHECKED_AUTO_CLASSES:
        reference = auto_map.get(auto_class)
        if isinstance(reference, (list, tuple)):  # AutoTokenizer-style pairs; take the first
            reference = next((r for r in reference if r), None)
        if not isinstance(reference, str) or "." not in reference:
            continue
        repo, _, module = reference.rpartition("--")
        file = module.rsplit(".", 1)[0].replace(".", "/") + ".py"
        file = f"{repo}/{file}" if repo else file
        if file not in files:
            files.append(file)
    return files


def check_remote_code(folder, trust_remote_code: bool) -> None:
    """Raise ValueError (one line) when the config in `folder` needs remote code that cannot run:
    without `trust_remote_code`, naming `--trust-remote-code` and the files it would run; with it,
    naming the files missing beside `config.json`."""
    folder = Path(folder)
    config = read_config_json(folder)
    files = remote_code_files(config)
    if not files:
        return
    missing = [file for file in files if not (folder / file).is_file()]
    model_type = config.get("model_type", "?")
    if not trust_remote_code:
        where = f"; missing here: {', '.join(missing)}" if missing else ""
        raise InputError(
            f"{folder}: model_type {model_type!r} needs remote code ({', '.join(files)}, named by auto_map in "
            f"config.json){where}; pass --trust-remote-code (trust_remote_code=True) to run it"
        )
    if missing:
        raise InputError(
            f"{folder}: --trust-remote-code runs the code config.json names (auto_map), expected "
            f"{', '.join(files)} beside it, missing {', '.join(missing)}; nothing is downloaded: copy the "
            "model's .py files into the folder"
        )
