"""Workers the tests start as subprocesses (`python -m torch.distributed.run ... tests/scripts/<worker>.py`).

Each inserts the repository root into `sys.path` and imports `tests.helpers` and `tests.scripts.two_ranks`."""
