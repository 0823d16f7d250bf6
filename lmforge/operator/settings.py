"""Every Kopf setting of the operator, in one startup handler, plus the login that goes with it.

Why these values:

* finalizer and annotations under ``lmforge.dev``: users see whose marks are on their objects,
  and two Kopf operators in one cluster never fight over each other's state;
* progress and diff-base only in annotations: the CRDs' status schema is structural, so Kopf's
  default ``status.kopf`` would be pruned by the API server and handlers would re-run forever;
* events at WARNING: failures are worth an event, routine progress is in the status;
* standalone by default (one replica, no KopfPeering CRD needed), peering on request.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

PREFIX = "lmforge.dev"
FINALIZER = f"{PREFIX}/finalizer"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = memo.config
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "lmforge-operator"
    settings.peering.standalone = not config.peering
    settings.peering.mandatory = config.peering
    settings.peering.name = "lmforge"
    settings.execution.max_workers = config.workers
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """Kopf and the children's client use one configuration (in-cluster, kubeconfig or given)."""
    config = memo.kube.configuration
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    scheme, token = None, None
    if header:
        parts = header.split(" ", 1)
        scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )
