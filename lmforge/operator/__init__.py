"""The lmforge operator: a Kopf reconciler that runs TrainingJobs and CompressionJobs as pods.

Modules, one job each: :mod:`settings` (Kopf settings), :mod:`children` (pure builders of the
owned objects), :mod:`status` (phases and conditions), :mod:`classify` (why a pod ended and
whether that is worth a restart), :mod:`progress` (reading rank 0's metrics), :mod:`kube` (the
few API calls the operator makes), :mod:`reconcile` (the per-job state machine),
:mod:`handlers` (Kopf handlers), :mod:`metrics` (the operator's own Prometheus metrics) and
:mod:`main` (``run_operator`` for ``lmforge operator``).
"""
