"""Shared base classes and field types for the lmforge spec and status models.

The spec models are strict: a manifest that says ``layers: "12"`` is rejected, because the
Kubernetes API server would reject it too (the CRD says integer). Keeping the model as strict
as the CRD is what lets one manifest pass both `lmforge validate` and `kubectl apply`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError


class SpecModel(BaseModel):
    """Base of every user-written block: camelCase keys, unknown keys rejected, no NaN/inf."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        use_attribute_docstrings=False,
    )

    def to_manifest(self) -> dict[str, Any]:
        """The block as a user would write it: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(BaseModel):
    """Base of status blocks: written by lmforge, read back leniently (extra keys ignored)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        allow_inf_nan=False,
    )

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def rule_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field rule violation that names the offending field (relative to the model).

    Pydantic reports model-level validator errors at the model's location; the ``field`` in the
    context lets :mod:`lmforge.api.errors` point the user at the exact key to change.
    """
    return PydanticCustomError("spec_rule", "{message}", {"field": field, "message": message})


URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file://.+)$"
_URI_RE = re.compile(URI_PATTERN)


def _check_uri(value: str) -> str:
    if value.startswith("s3://") and not _URI_RE.match(value):
        bucket = value[5:].split("/", 1)[0]
        raise PydanticCustomError(
            "uri",
            "bucket name '{bucket}' is not valid; S3 bucket names have 3 to 63 lower-case "
            "letters, digits, dots or hyphens (s3://BUCKET/PREFIX)",
            {"bucket": bucket},
        )
    if not _URI_RE.match(value):
        raise PydanticCustomError(
            "uri",
            "'{value}' is not a supported URI; use s3://BUCKET/PREFIX for object storage or "
            "file:///absolute/path (file://relative/path is relative to the working directory)",
            {"value": value},
        )
    return value


Uri = Annotated[
    str,
    AfterValidator(_check_uri),
    WithJsonSchema({"type": "string", "pattern": URI_PATTERN, "minLength": 6}),
]
"""An ``s3://`` or ``file://`` location."""

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_LABEL_RE = re.compile(DNS_LABEL_PATTERN)


def _check_dns_label(value: str) -> str:
    if not _DNS_LABEL_RE.match(value) or len(value) > 63:
        raise PydanticCustomError(
            "dns_label",
            "'{value}' is not a valid Kubernetes name; use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters",
            {"value": value},
        )
    return value


K8sName = Annotated[
    str,
    AfterValidator(_check_dns_label),
    WithJsonSchema({"type": "string", "pattern": DNS_LABEL_PATTERN, "maxLength": 63}),
]
"""A Kubernetes object name (DNS-1123 label): Secrets, queues, priority classes."""

QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _to_quantity(value: Any) -> Any:
    """Kubernetes quantities may be written as numbers (``cpu: 4``) or strings (``"500m"``)."""
    if isinstance(value, bool):
        return value  # let the str check below reject it
    if isinstance(value, int | float):
        if value < 0:
            raise PydanticCustomError(
                "quantity", "{value} is negative; resource quantities must be >= 0", {"value": value}
            )
        return str(value)
    return value


def _check_quantity(value: str) -> str:
    if not _QUANTITY_RE.match(value):
        raise PydanticCustomError(
            "quantity",
            "'{value}' is not a Kubernetes quantity; write e.g. 4, 500m, 16Gi or 512Mi",
            {"value": value},
        )
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_to_quantity),
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity such as ``4``, ``500m`` or ``16Gi``."""


def describe(text: str, **kwargs: Any) -> Any:
    """``Field`` with a mandatory description: every field shows up in ``kubectl explain``."""
    return Field(description=text, **kwargs)
