"""Every example runs, in its smallest setting (the README points users at them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


# A gloo worker thread of a finished 2-process run sometimes aborts as the interpreter exits (std::terminate,
# after the last step was printed and the process group destroyed: seen once in ~20 runs, never twice in a row)
GLOO_EXIT_ABORT = "terminate called without an active exception"


def run(*command: str, timeout: int = 300, **extra_env: str) -> str:
    """Run an example; one rerun when it failed only by gloo's abort at exit (a second failure fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra_env}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # shell scripts' python
    for attempt in range(2):
        result = subprocess.run(command, cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode == 0 or GLOO_EXIT_ABORT not in result.stderr:
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_trainer_sft(tmp_path):
    out = run(sys.executable, "trainer_sft.py", "--steps", "2", "--examples", "48", "--max-tokens", "1500",
              "--output-dir", str(tmp_path))
    assert "eval loss" in out


@pytest.mark.parametrize("packing", [False, True])
def test_trl_sft(tmp_path, packing):
    pytest.importorskip("trl")
    out = run(sys.executable, "trl_sft.py", "--steps", "2", "--examples", "48", "--output-dir", str(tmp_path),
              *(["--packing"] if packing else []))
    assert "train loss" in out


def test_accelerate_loop():
    out = run(sys.executable, "accelerate_loop.py", "--steps", "2", "--examples", "48")
    assert "step 2: loss" in out


def test_ddp_torchrun_two_processes(free_port):
    out = run("bash", "ddp_torchrun.sh", "--steps", "2", "--examples", "48", timeout=180, MASTER_PORT=str(free_port))
    assert "x 2 process(es)" in out


def test_accelerate_launch_multi_gpu_flag_starts_two_processes_on_cpu(free_port):
    """On CPU, `accelerate launch --num_processes 2` starts one process; with --multi_gpu, two (gloo)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port)]
    out = run(*launch, "--multi_gpu", "--num_processes", "2", "accelerate_loop.py", "--steps", "1", "--examples", "48",
              "--processes", "2", timeout=240)
    assert "x 2 process(es)" in out
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = subprocess.run([*launch, "--num_processes", "2", "accelerate_loop.py", "--steps", "1", "--examples", "48",
                            "--processes", "2"], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=240)
    assert alone.returncode != 0 and "expected 2 processes, got 1" in alone.stderr


def test_fsdp2_loop_two_processes(free_port):
    out = run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
              "fsdp2_loop.py", "--steps", "2", "--examples", "48", timeout=240)
    assert "step 2: loss" in out and "2 ranks, FSDP2: rank 0 holds" in out


def test_sequence_parallel_two_processes(free_port):
    out = run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
              "sequence_parallel.py", "--steps", "2", "--chain", "3", timeout=240)
    last = out.strip().splitlines()[-1]
    assert last.startswith("sequence-parallel loss equals one process: yes (max difference "), out[-2000:]


def test_check_my_model():
    out = run(sys.executable, "check_my_model.py", "llama")
    assert "exact" in out


@pytest.mark.parametrize("options", [[], ["--lora", "--max-tokens", "2000"]], ids=["full", "lora-budget"])
def test_trl_dpo(options):
    pytest.importorskip("trl")
    if "--lora" in options:
        pytest.importorskip("peft")
    out = run(sys.executable, "trl_dpo.py", "--steps", "2", "--examples", "24", *options)
    assert "reward margin" in out


@pytest.mark.parametrize("options", [[], ["--lora", "--beta", "0.04", "--max-tokens", "600"], ["--rloo", "--beta", "0.04"]],
                         ids=["grpo", "lora-reference-budget", "rloo-reference"])
def test_trl_grpo(options):
    pytest.importorskip("trl")
    if "--lora" in options:
        pytest.importorskip("peft")
    out = run(sys.executable, "trl_grpo.py", "--steps", "2", "--prompts", "8", *options)
    assert "reward" in out and "mean completion length" in out


def test_trl_reward():
    pytest.importorskip("trl")
    assert "pair accuracy" in run(sys.executable, "trl_reward.py", "--steps", "2", "--examples", "24")


@pytest.mark.parametrize("options", [[], ["--trainer"]], ids=["loop", "trainer"])
def test_sequence_weighted_loss(options):
    out = run(sys.executable, "sequence_weighted_loss.py", "--steps", "2", "--examples", "48", *options)
    assert "loss" in out and "examples" in out
