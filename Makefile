# Developer shortcuts. Tests: `python -m pytest` (see README).
VERSION := $(shell python3 -c 'import re; print(re.search(r"^version = \"([^\"]+)\"", open("pyproject.toml").read(), re.M).group(1))')
OPERATOR_IMAGE ?= ghcr.io/lmforge/operator:$(VERSION)
TRAINER_IMAGE ?= ghcr.io/lmforge/trainer:$(VERSION)
TRAINER_VARIANT ?= cuda

.PHONY: help crds test test-chart images operator-image trainer-image trainer-image-cpu kind-e2e

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

crds:  ## regenerate crds/ and charts/lmforge/crds/ from the API models
	lmforge crds

test:  ## the whole test suite
	python -m pytest

test-chart:  ## chart and monitoring tests only (Helm engine, kubernetes-validate, promtool, Prometheus)
	python -m pytest tests/test_chart.py tests/test_monitoring.py

images: operator-image trainer-image  ## build both images (needs Docker)

operator-image:  ## build the operator image (no torch)
	docker build -f operator/Dockerfile -t $(OPERATOR_IMAGE) .

trainer-image:  ## build the trainer image; TRAINER_VARIANT=cpu for the CPU variant
	docker build -f trainer/Dockerfile --build-arg VARIANT=$(TRAINER_VARIANT) -t $(TRAINER_IMAGE) .

trainer-image-cpu:  ## build the CPU trainer image
	$(MAKE) trainer-image TRAINER_VARIANT=cpu

kind-e2e:  ## build, load into kind, install the chart, run the quickstart to Succeeded (needs Docker)
	hack/kind-e2e.sh
