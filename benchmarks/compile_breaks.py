"""torch.compile on packed batches: graphs, graph breaks and recompiles, before and after.

    python benchmarks/compile_breaks.py [--before /work/main/src] [--steps 8] [--modes M ...] [--backend eager|inductor]

A tiny random Llama (2 layers, `attn_implementation="packcollate"`, prepared, CPU, fp32) in a plain loop of
`--steps` packed batches of varying length `N` and example count `k` (forward and backward). Each
source tree (`--before`: another checkout's `src`, e.g. main's; after: this one) runs in its own
process and reports:

- `torch._dynamo.explain` of one packed forward: graphs, graph breaks, and the break reasons
  (with the packcollate file:line they come from);
- per compile mode, the graphs Dynamo compiles for every step (a counting backend on top of the eager
  one: these are Dynamo's counts whatever the backend; `--backend inductor` also times real kernels)
  and the recompiles after the first step; `static` recompiles on every new shape up to
  `torch._dynamo.config.recompile_limit`, then runs that frame eagerly;
- the largest |loss| and gradient difference of the compiled model against the eager one.

Modes: `automatic` (`torch.compile(model)`: dynamic shapes after the first change), `dynamic=True`,
`static` (`dynamic=False`) and `static + pad_to_multiple_of=64` (`PackedCollator` buckets for `N`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

MODES = {
    "automatic": ({}, {}),
    "dynamic=True": ({"dynamic": True}, {}),
    "static": ({"dynamic": False}, {}),
    "static + pad_to_multiple_of=64": ({"dynamic": False}, {"pad_to_multiple_of": 64}),
}


def _batches(steps: int, collator_options: dict, seed: int = 0) -> list[dict]:
    import numpy as np

    from packcollate import PackedCollator

    rng = np.random.default_rng(seed)
    collator = PackedCollator(**collator_options)
    batches = []
    for _ in range(steps):
        lengths = np.clip(np.round(rng.lognormal(np.log(30), 0.6, int(rng.integers(4, 12)))), 2, 160).astype(int)
        batches.append(collator([{"input_ids": rng.integers(3, 128, n).tolist()} for n in lengths]))
    return batches


def _model(layers: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import packcollate  # registers the backend

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="packcollate")
    prepare = getattr(packcollate, "prepare", None)  # trees before `prepare` existed need none
    return prepare(model) if prepare is not None else model


def _explain(model, batch) -> dict:
    import torch

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**batch)
    reasons, places = Counter(), Counter()
    for reason in explanation.break_reasons:
        reasons[reason.reason.splitlines()[0][:120]] += 1
        ours = [frame for frame in reason.user_stack if "packcollate" in frame.filename]
        if ours:
            places[f"{Path(ours[-1].filename).name}:{ours[-1].lineno}"] += 1
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "reasons": dict(reasons.most_common()), "packcollate_break_sites": dict(places.most_common())}


def _loop(model, batches, compile_options: dict, backend: str) -> dict:
    import torch

    torch._dynamo.reset()
    compiled_graphs = [0]

    def counting(gm, example_inputs):
        compiled_graphs[0] += 1
        if backend == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    eager = model
    compiled = torch.compile(copy.deepcopy(model), backend=counting, **compile_options)
    per_step, seconds, loss_diff, grad_diff = [], [], 0.0, 0.0
    for batch in batches:
        start = time.perf_counter()
        before = compiled_graphs[0]
        out = compiled(**batch)
        out.loss.backward()
        seconds.append(round(time.perf_counter() - start, 3))
        per_step.append(compiled_graphs[0] - before)
        reference = eager(**batch)
        reference.loss.backward()
        loss_diff = max(loss_diff, abs(float(out.loss.detach() - reference.loss.detach())))
        for p, q in zip(compiled.parameters(), eager.parameters()):
            grad_diff = max(grad_diff, float((p.grad - q.grad).abs().max()))
            p.grad = q.grad = None
    return {"graphs_per_step": per_step, "graphs_total": sum(per_step), "recompiled_graphs_after_step_0": sum(per_step[1:]),
            "seconds_per_step": seconds, "max_loss_diff": loss_diff, "max_grad_diff": grad_diff,
            "packed_lengths": [int(b["input_ids"].shape[1]) for b in batches],
            "examples_per_step": [int(len(b["cu_seq_lens_q"]) - 1) for b in batches]}


def child(args) -> dict:
    import torch

    torch.set_num_threads(1)
    model = _model(args.layers)
    result = {"explain": _explain(model, _batches(1, {})[0]), "modes": {},
              "recompile_limit": torch._dynamo.config.recompile_limit}
    for name in args.modes:
        compile_options, collator_options = MODES[name]
        result["modes"][name] = _loop(model, _batches(args.steps, collator_options), compile_options, args.backend)
    return result


def run_tree(src: str, args) -> dict:
    """`child` in a fresh process with `src` first on the path."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", out, "--steps", str(args.steps), "--layers", str(args.layers),
               "--backend", args.backend, "--modes", *args.modes]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def table(results: dict) -> str:
    lines = ["| source | explain: graphs | graph breaks | packcollate break sites |", "| --- | --- | --- | --- |"]
    for label, result in results.items():
        e = result["explain"]
        lines.append(f"| {label} | {e['graphs']} | {e['graph_breaks']} | {sum(e['packcollate_break_sites'].values())} |")
    lines += ["", "| source | mode | graphs compiled per step | recompiled graphs after step 0 | max loss diff | max grad diff |",
              "| --- | --- | --- | --- | --- | --- |"]
    for label, result in results.items():
        for mode, m in result["modes"].items():
            lines.append(f"| {label} | {mode} | {m['graphs_per_step']} | {m['recompiled_graphs_after_step_0']} | "
                         f"{m['max_loss_diff']:.2g} | {m['max_grad_diff']:.2g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="another source tree (its src folder) to measure first")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--backend", choices=["eager", "inductor"], default="eager")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child).write_text(json.dumps(child(args)))
        return
    import torch
    import transformers

    here = str(Path(__file__).resolve().parent.parent / "src")
    results = {}
    if args.before:
        results["before"] = run_tree(args.before, args)
    results["after"] = run_tree(here, args)
    print(table(results))
    document = {"command": " ".join(["python", "benchmarks/compile_breaks.py", *sys.argv[1:]]),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "model": f"tiny Llama, {args.layers} layers, hidden 32, packcollate attention, CPU fp32",
                "backend": args.backend, "results": results}
    out = Path(args.out) / ("compile_breaks.json" if args.backend == "eager" else f"compile_breaks_{args.backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
