"""Process exit codes of the lmforge commands, shared by the trainer and the operator.

The operator classifies a failed pod by its exit code: ``INVALID_SPEC`` is fatal (retrying the
same manifest cannot help), ``RETRYABLE`` and signals are worth a gang restart.
"""

OK = 0
PROBLEMS_FOUND = 1
"""`lmforge validate` / `crds --check`: the input has problems (the usual linter convention)."""
USAGE = 2
"""Wrong command-line usage (typer/click's own code)."""
QUALITY_GATE = 3
"""A quality gate failed, results written, never retried: `lmforge compress` (the compressed model got
worse than allowed) or `lmforge run` of a continual job (continual.maxForgetting)."""
RETRYABLE = 75
"""A transient fault (rendezvous timeout, storage outage, peer lost): restart from a checkpoint."""
INVALID_SPEC = 78
"""The manifest is invalid for this run (EX_CONFIG): fix the spec; never retried."""

DESCRIPTIONS = {
    OK: "success",
    PROBLEMS_FOUND: "problems found in the input (validate, crds --check)",
    USAGE: "command-line usage error",
    QUALITY_GATE: "quality gate failed: the compressed model got worse than allowed, or a continual run forgot more "
    "than continual.maxForgetting (results and model written); not retried",
    RETRYABLE: "retryable fault: the operator restarts the gang from the newest checkpoint",
    INVALID_SPEC: "invalid spec: fix the manifest; the operator fails the job without retrying",
}
