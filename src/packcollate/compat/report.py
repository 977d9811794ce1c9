"""What `check_model` reports: static findings, numeric trials per backend, and the verdicts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

OK, WARNING, ERROR = "ok", "warning", "error"
EXACT, CONTAMINATED, UNSUPPORTED = "exact", "contaminated", "unsupported"

# fp32 on a tiny random copy: kernels that differ only in summation order agree to ~1e-6; examples
# that leak into each other differ by ~1e-2 or more.
LOGIT_TOLERANCE = 1e-4  # max |logit_packed - logit_reference|
GRAD_TOLERANCE = 1e-3  # max over parameters of max|g_packed - g_reference| / max|g_reference|
# backends that only run in half precision are proven in bf16 against themselves, one example at a time
HALF_PRECISION_BACKENDS = ("flash_attention_2", "flash_attention_3")
BF16_TOLERANCE = 3e-2

REFERENCE_BACKEND = "eager"


@dataclass
class Finding:
    """One static check.

    Attributes:
        name: what was checked (`position_ids`, `layout_route`, `position_offset`, `rope_sections`,
            `recurrent_layers`, `context_length`, `use_cache`).
        status: `"ok"`, `"warning"` or `"error"`.
        message: what was found.
        fix: what to do about it (empty when nothing).
        note: a few words for tables.
    """

    name: str
    status: str
    message: str
    fix: str = ""
    note: str = ""


@dataclass
class Trial:
    """One packed forward and backward, compared with the reference.

    Attributes:
        use_cache: passed to the packed forward.
        verdict: `"exact"`, `"contaminated"` (runs, differs) or `"unsupported"` (raises).
        max_logit_diff, max_grad_rel_diff, loss_diff: the differences (None when it raised).
        worst_parameter: where the gradient differs most.
        error: the exception, one line, when unsupported.
    """

    use_cache: bool
    verdict: str
    max_logit_diff: float | None = None
    max_grad_rel_diff: float | None = None
    loss_diff: float | None = None
    worst_parameter: str = ""
    error: str = ""


@dataclass
class BackendResult:
    """The proof for one attention backend: a trial with `use_cache=False` and one with `True`."""

    backend: str
    trials: list[Trial]

    def trial(self, use_cache: bool) -> Trial:
        return next(t for t in self.trials if t.use_cache == use_cache)

    @property
    def verdict(self) -> str:
        """`contaminated` when any trial differs, else the verdict of `use_cache=False` (training)."""
        if any(t.verdict == CONTAMINATED for t in self.trials):
            return CONTAMINATED
        return self.trial(False).verdict

    @property
    def note(self) -> str:
        bad = [t for t in self.trials if t.verdict != EXACT]
        if self.verdict == CONTAMINATED and all(t.use_cache for t in bad if t.verdict == CONTAMINATED):
            return "contaminated only with use_cache=True"
        failed = next((t for t in bad if t.verdict == UNSUPPORTED), None)
        if failed is not None:
            when = "" if all(t.verdict == UNSUPPORTED for t in self.trials) else f" (use_cache={failed.use_cache})"
            return f"raises{when}: {failed.error}"
        return ""

    def to_dict(self) -> dict:
        return {"backend": self.backend, "verdict": self.verdict, "note": self.note,
                "trials": [dataclasses.asdict(t) for t in self.trials]}


@dataclass
class CompatReport:
    """What `check_model` found for one architecture.

    Attributes:
        target: what was checked, as the caller named it.
        model_type: the config's `model_type`.
        architecture: the causal-LM class.
        findings: the static checks, in order.
        backends: the numeric proof per attention backend (empty when it could not run).
        collator_options: the `PackedCollator` options this architecture needs (used by the proof).
        error: why there is no numeric proof (the tiny copy could not be built or run), else "".
        device: where the proof ran.
    """

    target: str
    model_type: str
    architecture: str
    findings: list[Finding]
    backends: list[BackendResult]
    collator_options: dict
    error: str = ""
    device: str = "cpu"

    def result(self, backend: str) -> BackendResult | None:
        return next((b for b in self.backends if b.backend == backend), None)

    def verdict(self, backend: str) -> str | None:
        """The backend's verdict, or None when it was not proven."""
        result = self.result(backend)
        return None if result is None else result.verdict

    def ok_for(self, backend: str, use_cache: bool | None = None) -> bool:
        """Packing is proven exact with `backend` (both `use_cache` values, or the one given) and no
        static check found an error."""
        result = self.result(backend)
        if result is None or any(f.status == ERROR for f in self.findings):
            return False
        return result.verdict == EXACT if use_cache is None else result.trial(use_cache).verdict == EXACT

    def to_dict(self) -> dict:
        return {
            "target": self.target, "model_type": self.model_type, "architecture": self.architecture,
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "backends": [b.to_dict() for b in self.backends],
            "collator_options": self.collator_options, "error": self.error, "device": self.device,
            "tolerances": {"logits": LOGIT_TOLERANCE, "grads": GRAD_TOLERANCE},
        }

    def format_table(self) -> str:
        """A readable report: findings with their fixes, then the proof per backend."""
        lines = [f"{self.architecture} (model_type {self.model_type!r}, checked: {self.target})", "", "static checks:"]
        for f in self.findings:
            lines.append(f"  {f.status:<8} {f.name:<17} {f.message}")
            if f.fix:
                lines.append(f"  {'':<8} {'':<17} fix: {f.fix}")
        lines.append("")
        if self.error:
            lines.append(f"numeric proof: none ({self.error})")
            return "\n".join(lines)
        lines.append(
            f"numeric proof on a tiny random copy ({self.device}, fp32): packed vs one example at a time "
            f"through {REFERENCE_BACKEND!r}; exact = max |logit diff| <= {LOGIT_TOLERANCE:g} and max relative "
            f"gradient diff <= {GRAD_TOLERANCE:g}"
        )
        header = f"  {'backend':<18} {'verdict':<13} {'use_cache=False':<32} {'use_cache=True':<32} note"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for result in self.backends:
            cells = [_trial_cell(result.trial(use_cache)) for use_cache in (False, True)]
            lines.append(f"  {result.backend:<18} {result.verdict:<13} {cells[0]:<32} {cells[1]:<32} {result.note}")
        options = ", ".join(f"{k}={v!r}" for k, v in self.collator_options.items())
        lines += ["", f"collator: PackedCollator({options})"]
        return "\n".join(lines)


def _trial_cell(trial: Trial) -> str:
    if trial.verdict == UNSUPPORTED:
        return UNSUPPORTED
    return f"{trial.verdict} ({trial.max_logit_diff:.1e}, {trial.max_grad_rel_diff:.1e})"
