"""The lines a `packcollate` command wrote to stderr itself, without what other libraries print on import."""

#: Notes that are not the command's: the `kernels` package (imported by transformers >= 5.25 with any
#: model file) says once per hub kernel, in offline mode, that it skips that kernel's publisher check.
FOREIGN_NOTES = ("Skipping publisher trust check for ",)


def own_lines(stderr: str) -> list[str]:
    """The non-blank lines of `stderr` that are not `FOREIGN_NOTES`."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(FOREIGN_NOTES)]
