{{- define "tfscache.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tfscache.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* the headless Service whose ready endpoints are the cluster's members */}}
{{- define "tfscache.membersService" -}}
{{- printf "%s-members" (include "tfscache.fullname" .) -}}
{{- end -}}

{{- define "tfscache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tfscache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tfscache.labels" -}}
{{ include "tfscache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tfscache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tfscache.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tfscache.terminationGracePeriodSeconds" -}}
{{- $drain := int .Values.tfscache.drainTimeoutSeconds -}}
{{- $grace := .Values.terminationGracePeriodSeconds | default (add $drain 30) | int -}}
{{- if le $grace $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than tfscache.drainTimeoutSeconds (%d)" $grace $drain) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}

{{/* tfscache.yaml */}}
{{- define "tfscache.config" -}}
{{- $source := .Values.modelSource -}}
{{- $provider := dict -}}
{{- if eq $source.type "pvc" -}}
{{- if not $source.pvc.claimName -}}
{{- fail "modelSource.pvc.claimName: a value is required for modelSource.type pvc" -}}
{{- end -}}
{{- $provider = dict "type" "disk" "disk" (dict "base_path" $source.pvc.mountPath) -}}
{{- else if eq $source.type "s3" -}}
{{- if not $source.s3.bucket -}}
{{- fail "modelSource.s3.bucket: a value is required for modelSource.type s3" -}}
{{- end -}}
{{- $s3 := dict "bucket" $source.s3.bucket "prefix" $source.s3.prefix -}}
{{- with $source.s3.region }}{{- $_ := set $s3 "region" . -}}{{- end -}}
{{- with $source.s3.endpointUrl }}{{- $_ := set $s3 "endpoint_url" . -}}{{- end -}}
{{- $provider = dict "type" "s3" "s3" $s3 -}}
{{- else -}}
{{- fail (printf "modelSource.type: expected pvc or s3, got %q" $source.type) -}}
{{- end -}}
{{- $config := dict
  "listen" (dict "host" "0.0.0.0" "rest_port" (int .Values.tfscache.restPort) "grpc_port" (int .Values.tfscache.grpcPort)
                 "drain_timeout_seconds" .Values.tfscache.drainTimeoutSeconds)
  "model_provider" $provider
  "disk_cache" (dict "path" .Values.cache.path "capacity_bytes" .Values.cache.diskCapacity)
  "serving" (dict "grpc_target" (printf "127.0.0.1:%d" (int .Values.tfserving.grpcPort))
                  "rest_url" (printf "http://127.0.0.1:%d" (int .Values.tfserving.restPort))
                  "model_path" .Values.cache.servingPath
                  "max_models" (int .Values.cache.maxModels) "max_bytes" .Values.cache.maxBytes
                  "memory_factor" .Values.cache.memoryFactor)
  "cluster" (dict "replicas_per_model" (int .Values.cluster.replicasPerModel)
                  "discovery" (dict "type" "kubernetes" "service" (include "tfscache.membersService" .)
                                    "rest_port_name" "rest" "grpc_port_name" "grpc"))
  "logging" (dict "level" .Values.tfscache.logLevel "format" .Values.tfscache.logFormat)
-}}
{{- toYaml (mergeOverwrite $config .Values.tfscache.extraConfig) -}}
{{- end -}}

{{/* the Secret holding cluster.secret, the key "secret" */}}
{{- define "tfscache.clusterSecret" -}}
{{- .Values.cluster.existingSecret | default (printf "%s-cluster" (include "tfscache.fullname" .)) -}}
{{- end -}}
