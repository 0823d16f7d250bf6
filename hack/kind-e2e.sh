#!/usr/bin/env bash
# End to end on a local kind cluster: build both images (the trainer's CPU variant), create the
# cluster from kind-config.yaml, load the images, install the chart, run the quickstart as a
# TrainingJob and wait for it to succeed.
#
# Needs docker, kind, kubectl and helm on PATH, about 10 GB of disk and 8 GB of memory for Docker.
# It cannot run in lmforge's CI or development sandbox (no Docker daemon there); the chart, the
# RBAC and the monitoring are tested there without a cluster (tests/test_chart.py,
# tests/test_monitoring.py). Run it by hand, or `make kind-e2e`.
#
# Environment: CLUSTER (default lmforge), KEEP_CLUSTER=1 keeps the cluster afterwards,
# TIMEOUT (seconds to wait for Succeeded, default 1800).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${CLUSTER:-lmforge}"
TIMEOUT="${TIMEOUT:-1800}"
VERSION="$(python3 -c 'import re,sys; print(re.search(r"^version = \"([^\"]+)\"", open("pyproject.toml").read(), re.M).group(1))')"
OPERATOR_IMAGE="ghcr.io/lmforge/operator:${VERSION}"
# A local CPU build, handed to the operator through the chart's trainer.image values (jobs without
# spec.resources.image run it), so the quickstart needs no image field and nothing is pulled.
TRAINER_REGISTRY=localhost
TRAINER_REPOSITORY=lmforge/trainer
TRAINER_TAG="${VERSION}-cpu"
TRAINER_IMAGE="${TRAINER_REGISTRY}/${TRAINER_REPOSITORY}:${TRAINER_TAG}"
NAMESPACE=lmforge-system

for tool in docker kind kubectl helm python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done

echo "== building $OPERATOR_IMAGE and $TRAINER_IMAGE (CPU variant)"
docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
docker build -f trainer/Dockerfile --build-arg VARIANT=cpu -t "$TRAINER_IMAGE" .

if ! kind get clusters | grep -qx "$CLUSTER"; then
  echo "== creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 120s
fi
cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    echo "== failed; state for debugging:" >&2
    kubectl get tj,jobs,pods -A -o wide >&2 || true
    kubectl -n "$NAMESPACE" logs deployment/lmforge --tail=100 >&2 || true
    kubectl describe tj quickstart >&2 || true
  fi
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER"
  fi
  exit "$status"
}
trap cleanup EXIT

echo "== loading images"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$TRAINER_IMAGE"

echo "== installing the chart"
helm upgrade --install lmforge charts/lmforge --namespace "$NAMESPACE" --create-namespace --wait --timeout 5m \
  --set trainer.image.registry="$TRAINER_REGISTRY" --set trainer.image.repository="$TRAINER_REPOSITORY" \
  --set trainer.image.tag="$TRAINER_TAG" --set trainer.image.pullPolicy=Never
kubectl get crd trainingjobs.lmforge.dev compressionjobs.lmforge.dev

echo "== submitting the quickstart"
# Sized for a laptop: the CRD defaults (4 CPU, 16Gi per pod) would not schedule on kind.
python3 - > /tmp/lmforge-quickstart.yaml <<'PY'
import yaml
job = yaml.safe_load(open("examples/quickstart.yaml"))
job["spec"]["resources"].update({"cpu": "2", "memory": "4Gi", "sharedMemory": "512Mi"})
job["spec"]["training"]["maxSteps"] = 200
job["spec"]["training"]["evalInterval"] = 100
job["spec"]["checkpoint"]["interval"] = 100
print(yaml.safe_dump(job, sort_keys=False))
PY
kubectl apply -f /tmp/lmforge-quickstart.yaml

echo "== waiting up to ${TIMEOUT}s for phase Succeeded"
deadline=$(( $(date +%s) + TIMEOUT ))
while true; do
  phase="$(kubectl get tj quickstart -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  kubectl get tj quickstart --no-headers 2>/dev/null || true
  case "$phase" in
    Succeeded) break ;;
    Failed) echo "error: the quickstart failed" >&2; exit 1 ;;
  esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "error: timed out in phase '${phase:-none}'" >&2
    exit 1
  fi
  sleep 10
done
kubectl get tj quickstart -o yaml
echo "== the quickstart TrainingJob succeeded"
