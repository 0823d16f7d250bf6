"""The lmforge operator: a Kopf reconciler that runs TrainingJobs and CompressionJobs as pods.

Modules, one job each: :mod:`settings` (Kopf settings), :mod:`children` (pure builders of the
owned objects), :mod:`status` (loading the status, phases and conditions), :mod:`classify` (why
a pod ended and whether that is worth a restart), :mod:`progress` (reading rank 0's metrics),
:mod:`kube` (the few API calls the operator makes), :mod:`admission` (validating each spec and
making the static children), :mod:`reconcile` (the per-job state machine: one step over the
concerns below), :mod:`handlers` (Kopf handlers), :mod:`metrics` (the operator's own Prometheus
metrics) and :mod:`main` (``run_operator`` for ``lmforge operator``).

The concerns of a step, each a set of functions of one :class:`context.StepContext`
(:mod:`context`: what a step observes, remembers and rebuilds): :mod:`attempts` (run policy:
deadline, suspend, TTL; the attempt lifecycle and the restart policy), :mod:`preparing` (the
Preparing phase: the data-prepare Job and condition DataPrepared), :mod:`stall` (progress into
the status, the stall clock, phase Stalled) and :mod:`compression` (a CompressionJob's source
model and results).
"""
