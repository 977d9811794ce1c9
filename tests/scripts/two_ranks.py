"""Two-rank runs (torchrun, gloo, CPU) for the tests: one launcher, and the workers' watchdog and exit.

A finished gloo worker on these CPUs sometimes hangs as its objects are torn down, after its last
collective: `tests/scripts/ddp_stream_step.py` hung in 2 of 11 runs when `main()` returned (faulthandler's
stack: the `main(...)` line, no Python frame below, one gloo thread alive) and in 0 of 19 once it
left by `os._exit` inside `main()`. So every worker

- arms `watchdog()` first: a worker still running after `seconds` prints every thread's stack and
  exits 1, so a hang fails with its place rather than with the test's timeout;
- ends with `exit_now()` inside `main()`, after its last collective and once its result is saved:
  no destructor runs, and the process group is never torn down.
"""

import faulthandler
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def watchdog(seconds: int = 150) -> None:
    """Dump every thread's stack and exit 1 if this process is still running after `seconds`."""
    faulthandler.dump_traceback_later(seconds, exit=True)


def exit_now(code: int = 0) -> None:
    """Flush and leave at once: skip the destructors and the interpreter's teardown (see above)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(worker: str, *args: str, port: int, timeout: int = 240, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run `tests/scripts/<worker>` on `nproc` ranks (2); assert it exits 0, with the end of its output if not."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
               str(HERE / worker), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
