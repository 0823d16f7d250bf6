"""The lmforge API: pydantic models that define TrainingJob and CompressionJob.

These models are the single source of truth: the CRDs are generated from them
(`lmforge crds`), `lmforge validate` and the operator validate with them, and the trainer reads
its configuration through them.
"""

from lmforge.api.compression import CompressionJobSpec
from lmforge.api.manifest import KINDS, CompressionJob, TrainingJob
from lmforge.api.status import CompressionJobStatus, TrainingJobStatus
from lmforge.api.training import TrainingJobSpec

__all__ = [
    "KINDS",
    "CompressionJob",
    "CompressionJobSpec",
    "CompressionJobStatus",
    "TrainingJob",
    "TrainingJobSpec",
    "TrainingJobStatus",
]
