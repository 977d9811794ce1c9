"""The tests, one folder per layer of src/packcollate/ and one module per module it specifies.

Shared builders: helpers.py; fixtures: conftest.py; workers started as subprocesses: scripts/."""
