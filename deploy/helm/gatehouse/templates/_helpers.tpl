{{/* The chart's name, at most 63 characters (a DNS label). */}}
{{- define "gatehouse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the prefix of every object, at most 63 characters. */}}
{{- define "gatehouse.fullname" -}}
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

{{- define "gatehouse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gatehouse.labels" -}}
helm.sh/chart: {{ include "gatehouse.chart" . }}
{{ include "gatehouse.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gatehouse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gatehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gatehouse.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret whose keys become environment variables. */}}
{{- define "gatehouse.secretName" -}}
{{- default (include "gatehouse.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* gatehouse.toml's text: config.toml, else the chart's copy of the demo's. */}}
{{- define "gatehouse.toml" -}}
{{- if .Values.config.toml }}{{ .Values.config.toml }}{{ else }}{{ .Files.Get "files/gatehouse.toml" }}{{ end }}
{{- end }}

{{/* Longer than the preStop sleep plus [server] shutdown_grace_s, so a drain is never cut short. */}}
{{- define "gatehouse.terminationGrace" -}}
{{- $floor := add (int .Values.server.preStopSleepSeconds) (int .Values.server.shutdownGraceSeconds) }}
{{- $given := .Values.server.terminationGracePeriodSeconds }}
{{- if $given }}
{{- if le (int $given) (int $floor) }}
{{- fail (printf "server.terminationGracePeriodSeconds (%v) must be above preStopSleepSeconds + shutdownGraceSeconds (%v): Kubernetes would kill gatehouse while it drains" $given $floor) }}
{{- end }}
{{- int $given }}
{{- else }}
{{- add $floor 15 }}
{{- end }}
{{- end }}

{{/* What every gatehouse container gets: the ports and drain settings, the plain settings, the secrets. */}}
{{- define "gatehouse.env" -}}
- name: GATEHOUSE_PROJECT
  value: /project
- name: GATEHOUSE_SERVER__HOST
  value: 0.0.0.0
- name: GATEHOUSE_SERVER__PORT
  value: {{ .Values.server.port | quote }}
- name: GATEHOUSE_SERVER__ADMIN_HOST
  value: 0.0.0.0
- name: GATEHOUSE_SERVER__ADMIN_PORT
  value: {{ .Values.server.adminPort | quote }}
- name: GATEHOUSE_SERVER__SHUTDOWN_GRACE_S
  value: {{ .Values.server.shutdownGraceSeconds | quote }}
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- range .Values.secretEnv }}
- name: {{ required "secretEnv[].name is required" .name }}
  valueFrom:
    secretKeyRef:
      name: {{ required "secretEnv[].secretName is required" .secretName }}
      key: {{ required "secretEnv[].key is required" .key }}
{{- end }}
{{- end }}

{{- define "gatehouse.envFrom" -}}
- secretRef:
    name: {{ include "gatehouse.secretName" . }}
{{- end }}

{{/* The volumes of a gatehouse pod: gatehouse.toml, the writable state folder, /tmp. */}}
{{- define "gatehouse.volumes" -}}
{{- $configMap := index . 1 }}
{{- with index . 0 }}
{{- if .Values.config.enabled }}
- name: config
  configMap:
    name: {{ $configMap }}
{{- end }}
- name: state
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "gatehouse.volumeMounts" -}}
{{- if .Values.config.enabled }}
- name: config
  mountPath: /project/gatehouse.toml
  subPath: gatehouse.toml
  readOnly: true
{{- end }}
- name: state
  mountPath: /project/.gatehouse
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "gatehouse.podSecurity" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}
