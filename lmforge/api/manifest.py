"""Top-level TrainingJob and CompressionJob objects, as written in a manifest or read from the API."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from lmforge.api.base import DNS_LABEL_PATTERN, SpecModel, describe
from lmforge.api.compression import CompressionJobSpec
from lmforge.api.status import CompressionJobStatus, TrainingJobStatus
from lmforge.api.training import TrainingJobSpec

# Pods are named <job>-a<attempt>-<index>-<suffix> and their hostnames must fit 63 characters.
MAX_JOB_NAME_LENGTH = 45


def _check_job_name(value: str) -> str:
    if not re.match(DNS_LABEL_PATTERN, value):
        raise PydanticCustomError(
            "dns_label",
            "'{value}' is not a valid name; use lower-case letters, digits and '-', starting and "
            "ending with a letter or digit (e.g. gpt-small-1)",
            {"value": value},
        )
    if len(value) > MAX_JOB_NAME_LENGTH:
        raise PydanticCustomError(
            "name_too_long",
            "name is {length} characters; use at most {limit}, because pod hostnames "
            "<name>-a<attempt>-<rank> must fit in 63",
            {"length": len(value), "limit": MAX_JOB_NAME_LENGTH},
        )
    return value


JobName = Annotated[
    str,
    AfterValidator(_check_job_name),
    WithJsonSchema({"type": "string", "pattern": DNS_LABEL_PATTERN, "maxLength": MAX_JOB_NAME_LENGTH}),
]


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata lmforge reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow", strict=True)

    name: JobName = describe("Name of the job.")
    namespace: str | None = describe("Namespace; the current one when unset.", default=None)
    labels: dict[str, str] = describe("Labels.", default_factory=dict)
    annotations: dict[str, str] = describe("Annotations.", default_factory=dict)


class TrainingJob(SpecModel):
    """A TrainingJob manifest."""

    api_version: Literal["lmforge.dev/v1alpha1"] = Field(alias="apiVersion", description="API version.")
    kind: Literal["TrainingJob"] = describe("Kind.")
    metadata: ObjectMeta = describe("Object metadata.")
    spec: TrainingJobSpec = describe("The spec.")
    status: TrainingJobStatus | None = describe("Status written by the operator.", default=None)


class CompressionJob(SpecModel):
    """A CompressionJob manifest."""

    api_version: Literal["lmforge.dev/v1alpha1"] = Field(alias="apiVersion", description="API version.")
    kind: Literal["CompressionJob"] = describe("Kind.")
    metadata: ObjectMeta = describe("Object metadata.")
    spec: CompressionJobSpec = describe("The spec.")
    status: CompressionJobStatus | None = describe("Status written by the operator.", default=None)


KINDS: dict[str, type[SpecModel]] = {"TrainingJob": TrainingJob, "CompressionJob": CompressionJob}
