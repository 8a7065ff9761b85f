{{- define "switchyard.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The switchyard config file, exactly as mounted. */}}
{{- define "switchyard.config" -}}
{{ toYaml .Values.config }}
{{- end -}}

{{/* terminationGracePeriodSeconds: the drain timeout plus headroom for flush and commit. */}}
{{- define "switchyard.gracePeriod" -}}
{{- $drainMs := 30000 -}}
{{- with .Values.config.limits -}}{{- with .drain_timeout_ms -}}{{- $drainMs = . -}}{{- end -}}{{- end -}}
{{- add (div (add $drainMs 999) 1000) .Values.terminationGraceExtraSeconds -}}
{{- end -}}
