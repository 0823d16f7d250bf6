{{/* vim: set filetype=mustache: */}}
{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "lmforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: <release>-<chart>, or just the release name when it contains the chart
name. Truncated to 63 characters.
*/}}
{{- define "lmforge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "lmforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Namespace of the namespaced objects.
*/}}
{{- define "lmforge.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels: stable for the life of the release (Deployment selectors are immutable).
*/}}
{{- define "lmforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Standard labels on every object.
*/}}
{{- define "lmforge.labels" -}}
helm.sh/chart: {{ include "lmforge.chart" . }}
{{ include "lmforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lmforge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Labels of the operator's own objects (Deployment, Service, ServiceAccount, RBAC).
*/}}
{{- define "lmforge.operatorLabels" -}}
{{ include "lmforge.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
Name of the ServiceAccount the operator runs as.
*/}}
{{- define "lmforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lmforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Operator image reference: registry/repository, then @digest or :tag (default appVersion).
*/}}
{{- define "lmforge.image" -}}
{{- $repo := .Values.image.repository -}}
{{- if .Values.image.registry -}}
{{- $repo = printf "%s/%s" .Values.image.registry .Values.image.repository -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Trainer image of jobs that leave spec.resources.image unset (the operator's LMFORGE_TRAINER_IMAGE):
registry/repository, then @digest or :tag (default appVersion).
*/}}
{{- define "lmforge.trainerImage" -}}
{{- $repo := .Values.trainer.image.repository -}}
{{- if .Values.trainer.image.registry -}}
{{- $repo = printf "%s/%s" .Values.trainer.image.registry .Values.trainer.image.repository -}}
{{- end -}}
{{- if .Values.trainer.image.digest -}}
{{- printf "%s@%s" $repo .Values.trainer.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The operator pod as a NetworkPolicyPeer (it reads rank 0's /metrics for a job's progress).
*/}}
{{- define "lmforge.operatorPeer" -}}
{{- $labels := merge (include "lmforge.selectorLabels" . | fromYaml) (dict "app.kubernetes.io/component" "operator") -}}
{{- dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" (include "lmforge.namespace" .))) "podSelector" (dict "matchLabels" $labels) | toJson -}}
{{- end -}}

{{/*
Who may reach the trainer pods' metrics ports (JSON, LMFORGE_NETWORK_POLICY_METRICS_FROM): the
operator, then networkPolicy.metricsScrapers.
*/}}
{{- define "lmforge.metricsFrom" -}}
{{- prepend .Values.networkPolicy.metricsScrapers (include "lmforge.operatorPeer" . | fromJson) | toJson -}}
{{- end -}}

{{/*
The namespaces the PodMonitor looks for trainer pods in.
*/}}
{{- define "lmforge.podMonitorNamespaceSelector" -}}
{{- if .Values.watchNamespaces -}}
matchNames:
{{- range .Values.watchNamespaces }}
  - {{ . | quote }}
{{- end }}
{{- else -}}
any: true
{{- end -}}
{{- end -}}

{{/*
RBAC rules for running jobs in a namespace: exactly the calls the operator makes (see the
comments). Used by the ClusterRole when every namespace is watched, else by one Role per namespace.
*/}}
{{- define "lmforge.jobRules" -}}
# Kopf watches the lmforge objects, patches their finalizers, annotations and status, and the
# operator deletes a finished job after spec.runPolicy.ttlSecondsAfterFinished.
- apiGroups: ["lmforge.dev"]
  resources: ["trainingjobs", "compressionjobs"]
  verbs: ["list", "watch", "patch", "delete"]
# A CompressionJob of model.trainingJob reads that TrainingJob (its phase and model URI).
- apiGroups: ["lmforge.dev"]
  resources: ["trainingjobs"]
  verbs: ["get"]
- apiGroups: ["lmforge.dev"]
  resources: ["trainingjobs/status", "compressionjobs/status"]
  verbs: ["patch"]
# Children of a job: its ConfigMap (the manifest the pods read, patched when the spec changes)
# and headless Service (rendezvous). Created, or read back when they already exist.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
# One Indexed Job per attempt: created (read back if it exists), watched (Kopf index), and deleted
# when the gang is replaced.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Pods are watched (Kopf index) to classify failures; the failed pod's log tail goes into the status.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Kopf posts Kubernetes Events about the jobs (core/v1).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.networkPolicy.enabled }}
# One NetworkPolicy per job (its pods admit only the job's own pods and the scrape), created or
# read back when it exists; it goes with its job.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
{{- end }}
{{- if .Values.volcano.enabled }}
# Gang scheduling: one Volcano PodGroup per job with spec.scheduling.gang.
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["get", "create"]
{{- end }}
{{- if and .Values.operator.peering.enabled .Values.watchNamespaces }}
# Kopf peering between operator replicas, per namespace.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}

{{/*
Cluster-scoped rules Kopf itself needs (always in a ClusterRole).
*/}}
{{- define "lmforge.clusterRules" -}}
{{- if .Values.rbac.kopfScanning }}
# Kopf notices CRDs created or changed after it started.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
# Kopf notices the watched namespaces being created or deleted.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
{{- if and .Values.operator.peering.enabled (not .Values.watchNamespaces) }}
# Kopf peering between operator replicas, cluster-wide.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}
