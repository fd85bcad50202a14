{{/* Names, limited to 63 characters as Kubernetes names and labels are. */}}
{{- define "meetstream-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meetstream-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "meetstream-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "meetstream-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of the gateway pods (workers add their own component). */}}
{{- define "meetstream-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meetstream-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "meetstream-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meetstream-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "meetstream-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the Redis URL, and its key. */}}
{{- define "meetstream-gateway.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecret }}{{ else }}{{ include "meetstream-gateway.fullname" . }}{{ end }}
{{- end }}
{{- define "meetstream-gateway.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{- define "meetstream-gateway.authEnabled" -}}
{{- if or .Values.auth.secret .Values.auth.existingSecret }}true{{ end }}
{{- end }}
{{- define "meetstream-gateway.authSecretName" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecret }}{{ else }}{{ include "meetstream-gateway.fullname" . }}{{ end }}
{{- end }}
{{- define "meetstream-gateway.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}auth-secret{{ end }}
{{- end }}

{{/* Whether the chart makes its own Secret (for a URL or an auth secret given inline). */}}
{{- define "meetstream-gateway.ownSecret" -}}
{{- if or (not .Values.redis.existingSecret) (and .Values.auth.secret (not .Values.auth.existingSecret)) }}true{{ end }}
{{- end }}

{{/* terminationGracePeriodSeconds: preStop sleep, then the drain, then the shutdown margin. */}}
{{- define "meetstream-gateway.terminationGracePeriodSeconds" -}}
{{- add .Values.gateway.preStopSleepSeconds .Values.gateway.drainTimeoutSeconds .Values.gateway.shutdownMarginSeconds }}
{{- end }}

{{/* PromQL matchers selecting this release's series. */}}
{{- define "meetstream-gateway.ruleSelector" -}}
{{- default (printf "job=%q,namespace=%q" (include "meetstream-gateway.fullname" .) .Release.Namespace) .Values.metrics.prometheusRule.selector }}
{{- end }}

{{/* MEETSTREAM_REDIS_URL from its Secret; shared by the gateway and the workers. */}}
{{- define "meetstream-gateway.redisEnv" -}}
- name: MEETSTREAM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "meetstream-gateway.redisSecretName" . }}
      key: {{ include "meetstream-gateway.redisSecretKey" . }}
{{- end }}

{{/* Labels every worker pod carries, whatever its example: what the workers' Service selects. */}}
{{- define "meetstream-gateway.workerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "meetstream-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
meetstream.io/workload: worker
{{- end }}

{{/* "true" when any example worker is enabled. */}}
{{- define "meetstream-gateway.anyWorker" -}}
{{- range $name := list "greeter" "recorder" "bargein" "announcer" }}{{ if (index $.Values.workers $name).enabled }}true{{ end }}{{ end }}
{{- end }}

{{/* The workers' Service (and so their Prometheus job). */}}
{{- define "meetstream-gateway.workersName" -}}
{{- printf "%s-workers" (include "meetstream-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* PromQL matchers selecting this release's worker series. */}}
{{- define "meetstream-gateway.workerRuleSelector" -}}
{{- default (printf "job=%q,namespace=%q" (include "meetstream-gateway.workersName" .) .Release.Namespace) .Values.metrics.prometheusRule.workers.selector }}
{{- end }}
