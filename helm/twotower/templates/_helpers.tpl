{{/*
Names. KubeRay derives `<name>-head-svc`, `<name>-serve-svc` and `<name>-raycluster-xxxxx` from the
RayService name, so it is kept to 40 characters.
*/}}
{{- define "twotower.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "twotower.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "twotower.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "twotower.selectorLabels" -}}
app.kubernetes.io/name: {{ include "twotower.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "twotower.labels" -}}
helm.sh/chart: {{ include "twotower.chart" . }}
{{ include "twotower.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of every Ray pod of this release (the metrics Service and the NetworkPolicy select them). */}}
{{- define "twotower.rayPodLabels" -}}
{{ include "twotower.selectorLabels" . }}
twotower.io/ray-node: "true"
{{- end }}

{{- define "twotower.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "twotower.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "twotower.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* True (non-empty) when a value is set, i.e. not null/absent. 0 and false count as set. */}}
{{- define "twotower.isSet" -}}
{{- if not (kindIs "invalid" .) }}true{{ end }}
{{- end }}

{{/*
The model directory the application loads: serve.model when set, else modelStorage's mount path
(+ subPath). Empty when neither gives one (twotower.validate fails then).
*/}}
{{- define "twotower.modelPath" -}}
{{- $m := .Values.modelStorage }}
{{- if include "twotower.isSet" .Values.serve.model }}
{{- .Values.serve.model }}
{{- else if ne $m.type "none" }}
{{- if $m.subPath }}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (trimAll "/" $m.subPath) }}
{{- else }}
{{- $m.mountPath }}
{{- end }}
{{- end }}
{{- end }}

{{/* Tower pairs one worker pod holds. */}}
{{- define "twotower.pairsPerWorker" -}}
{{- $w := .Values.workers }}
{{- if include "twotower.isSet" $w.pairsPerWorker }}
{{- int $w.pairsPerWorker }}
{{- else if .Values.serve.pair.use_gpus }}
{{- div (int $w.gpus) 2 }}
{{- else }}
{{- 1 }}
{{- end }}
{{- end }}

{{/*
Tower pairs (Serve replicas of TowerPair) at the low end, start and high end, as JSON:
a fixed serve.replicas gives the same number three times; otherwise the autoscaling bounds.
*/}}
{{- define "twotower.pairCounts" -}}
{{- $s := .Values.serve }}
{{- $a := $s.autoscaling }}
{{- if include "twotower.isSet" $s.replicas }}
{{- dict "min" (int $s.replicas) "initial" (int $s.replicas) "max" (int $s.replicas) "fixed" true | toJson }}
{{- else }}
{{- $initial := int $a.min_replicas }}
{{- if include "twotower.isSet" $a.initial_replicas }}{{ $initial = int $a.initial_replicas }}{{ end }}
{{- dict "min" (int $a.min_replicas) "initial" $initial "max" (int $a.max_replicas) "fixed" false | toJson }}
{{- end }}
{{- end }}

{{/*
Worker pods (replicas, minReplicas, maxReplicas) as JSON: workers.* when set, else the tower pairs
divided by pairsPerWorker, rounded up. Without the Ray autoscaler every pod the pairs may need starts.
*/}}
{{- define "twotower.workerCounts" -}}
{{- $w := .Values.workers }}
{{- $pairs := include "twotower.pairCounts" . | fromJson }}
{{- $ppw := max 1 (int (include "twotower.pairsPerWorker" .)) }}
{{- $min := int (ceil (divf (int $pairs.min) $ppw)) }}
{{- $max := int (ceil (divf (int $pairs.max) $ppw)) }}
{{- if include "twotower.isSet" $w.minReplicas }}{{ $min = int $w.minReplicas }}{{ end }}
{{- if include "twotower.isSet" $w.maxReplicas }}{{ $max = int $w.maxReplicas }}{{ end }}
{{- $replicas := $max }}
{{- if .Values.autoscaler.enabled }}
{{- $replicas = min $max (max $min (int (ceil (divf (int $pairs.initial) $ppw)))) }}
{{- end }}
{{- if include "twotower.isSet" $w.replicas }}{{ $replicas = int $w.replicas }}{{ end }}
{{- dict "replicas" $replicas "min" $min "max" $max | toJson }}
{{- end }}

{{/*
Checks a JSON schema cannot express. Each failure names the value(s) to change.
*/}}
{{- define "twotower.validate" -}}
{{- $s := .Values.serve }}
{{- $a := $s.autoscaling }}
{{- $p := $s.pair }}
{{- $w := .Values.workers }}
{{- $m := .Values.modelStorage }}
{{- /* ports */}}
{{- if eq (int $s.http_port) (int $s.grpc_port) }}
{{- fail (printf "serve.grpc_port: must differ from serve.http_port (both %d)" (int $s.http_port)) }}
{{- end }}
{{- $headPorts := dict }}
{{- range $name, $port := dict "serve.http_port" $s.http_port "serve.grpc_port" $s.grpc_port "head.dashboardPort" .Values.head.dashboardPort "head.metricsPort" .Values.head.metricsPort "GCS (6379)" 6379 "Ray client (10001)" 10001 }}
{{- $key := toString (int $port) }}
{{- if hasKey $headPorts $key }}
{{- fail (printf "%s: port %s is already used by %s on the head pod" $name $key (get $headPorts $key)) }}
{{- end }}
{{- $_ := set $headPorts $key $name }}
{{- end }}
{{- if or (eq (int $w.metricsPort) (int $s.http_port)) (eq (int $w.metricsPort) (int $s.grpc_port)) }}
{{- fail (printf "workers.metricsPort: %d is a serve port" (int $w.metricsPort)) }}
{{- end }}
{{- if ne (int $s.metrics_port) (int .Values.head.metricsPort) }}
{{- fail (printf "serve.metrics_port: must equal head.metricsPort (%d and %d): both name the head's Ray metrics port" (int $s.metrics_port) (int .Values.head.metricsPort)) }}
{{- end }}
{{- /* Serve autoscaling bounds (as ServeConfig checks them) */}}
{{- if lt (int $a.max_replicas) (max 1 (int $a.min_replicas)) }}
{{- fail (printf "serve.autoscaling.max_replicas: must be >= max(1, serve.autoscaling.min_replicas=%d) (got %d)" (int $a.min_replicas) (int $a.max_replicas)) }}
{{- end }}
{{- if include "twotower.isSet" $a.initial_replicas }}
{{- if or (lt (int $a.initial_replicas) (int $a.min_replicas)) (gt (int $a.initial_replicas) (int $a.max_replicas)) }}
{{- fail (printf "serve.autoscaling.initial_replicas: must lie in [min_replicas=%d, max_replicas=%d] (got %d)" (int $a.min_replicas) (int $a.max_replicas) (int $a.initial_replicas)) }}
{{- end }}
{{- end }}
{{- /* tower placement */}}
{{- if and (eq $p.transport "nccl") (not $p.use_gpus) }}
{{- fail "serve.pair.transport: nccl needs serve.pair.use_gpus: true (and GPU workers); use gloo or auto on CPU" }}
{{- end }}
{{- $ppw := int (include "twotower.pairsPerWorker" .) }}
{{- if $p.use_gpus }}
{{- if lt (int $w.gpus) 2 }}
{{- fail (printf "workers.gpus: serve.pair.use_gpus needs at least 2 GPUs per worker pod, one per tower (got %d)" (int $w.gpus)) }}
{{- end }}
{{- if gt (mul 2 $ppw) (int $w.gpus) }}
{{- fail (printf "workers.pairsPerWorker: %d tower pairs need %d GPUs but workers.gpus is %d" $ppw (mul 2 $ppw) (int $w.gpus)) }}
{{- end }}
{{- end }}
{{- if lt $ppw 1 }}
{{- fail "workers.pairsPerWorker: must be >= 1" }}
{{- end }}
{{- /* worker group size */}}
{{- $counts := include "twotower.workerCounts" . | fromJson }}
{{- $pairs := include "twotower.pairCounts" . | fromJson }}
{{- if lt (int $counts.max) (int $counts.min) }}
{{- fail (printf "workers.maxReplicas: must be >= workers.minReplicas (got maxReplicas=%d < minReplicas=%d)" (int $counts.max) (int $counts.min)) }}
{{- end }}
{{- if or (lt (int $counts.replicas) (int $counts.min)) (gt (int $counts.replicas) (int $counts.max)) }}
{{- fail (printf "workers.replicas: must lie in [minReplicas=%d, maxReplicas=%d] (got %d)" (int $counts.min) (int $counts.max) (int $counts.replicas)) }}
{{- end }}
{{- if lt (mul (int $counts.max) $ppw) (int $pairs.max) }}
{{- fail (printf "workers.maxReplicas: %d worker pod(s) x %d tower pair(s) each cannot hold the %d tower pairs serve asks for (serve.replicas or serve.autoscaling.max_replicas)" (int $counts.max) $ppw (int $pairs.max)) }}
{{- end }}
{{- /* model location */}}
{{- if not (include "twotower.modelPath" .) }}
{{- fail "serve.model: no model location: set serve.model to a directory in the image, or modelStorage.type to pvc, hostPath or init" }}
{{- end }}
{{- if eq $m.type "pvc" }}
{{- if and (not $m.pvc.existingClaim) (not $m.pvc.create) }}
{{- fail "modelStorage.pvc: set existingClaim to a claim holding the weights, or create: true" }}
{{- end }}
{{- else if eq $m.type "hostPath" }}
{{- if not $m.hostPath.path }}
{{- fail "modelStorage.hostPath.path: required with modelStorage.type hostPath (a directory on every GPU node)" }}
{{- end }}
{{- else if eq $m.type "init" }}
{{- if and (not $m.init.command) (not $m.init.sourceVolume) }}
{{- fail "modelStorage.init: set sourceVolume (copied into the model directory) or command (e.g. an object-store copy of sourceUrl)" }}
{{- end }}
{{- end }}
{{- if and (ne $m.type "none") (include "twotower.isSet" $s.model) }}
{{- if not (hasPrefix (trimSuffix "/" $m.mountPath) $s.model) }}
{{- fail (printf "serve.model: %s is outside modelStorage.mountPath %s; leave serve.model null to use the mounted model, or set modelStorage.type none" $s.model $m.mountPath) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
serveConfigV2: what twotower.cluster.serve.deploy.serve_deploy_config(ServeConfig) returns for the
`serve` values (tests/helm/test_chart.py compares the two).
*/}}
{{- define "twotower.serveConfig" -}}
{{- $s := .Values.serve }}
{{- $p := $s.pair }}
{{- $args := deepCopy $s }}
{{- $_ := set $args "model" (include "twotower.modelPath" .) }}
{{- $pair := dict "name" "TowerPair" "ray_actor_options" (dict "num_cpus" $p.replica_cpus) "max_ongoing_requests" $s.max_ongoing_requests "max_queued_requests" $s.max_queued_requests "graceful_shutdown_timeout_s" $s.drain_timeout_s "health_check_period_s" 10 "health_check_timeout_s" 30 }}
{{- if include "twotower.isSet" $s.replicas }}
{{- $_ := set $pair "num_replicas" $s.replicas }}
{{- else }}
{{- $auto := dict }}
{{- range $k, $v := $s.autoscaling }}
{{- if include "twotower.isSet" $v }}{{ $_ := set $auto $k $v }}{{ end }}
{{- end }}
{{- $_ := set $pair "autoscaling_config" $auto }}
{{- end }}
{{- if $p.enabled }}
{{- $tower := dict "CPU" (maxf $p.worker_cpus 0.01) }}
{{- if $p.use_gpus }}{{ $tower = dict "GPU" 1.0 }}{{ end }}
{{- $_ := set $pair "placement_group_bundles" (list (dict "CPU" $p.replica_cpus) $tower (deepCopy $tower)) }}
{{- $_ := set $pair "placement_group_strategy" "STRICT_PACK" }}
{{- end }}
{{- if eq $s.request_router "prefix_affinity" }}
{{- $kwargs := dict "model" $args.model "grid" $s.engine.prefix_cache_grid "imbalance" $s.affinity_imbalance }}
{{- $_ := set $pair "request_router_config" (dict "request_router_class" "twotower.cluster.serve.prefix_router:PrefixAffinityRouter" "request_router_kwargs" $kwargs) }}
{{- end }}
{{- $app := dict "name" $s.app_name "route_prefix" "/" "import_path" "twotower.cluster.serve.app:build_app" "args" $args "deployments" (list $pair (dict "name" "Ingress")) }}
{{- $http := dict "host" $s.host "port" $s.http_port }}
{{- if $s.tls_certfile }}{{ $_ := set $http "ssl_certfile" $s.tls_certfile }}{{ end }}
{{- if $s.tls_keyfile }}{{ $_ := set $http "ssl_keyfile" $s.tls_keyfile }}{{ end }}
{{- if $s.tls_ca_certs }}{{ $_ := set $http "ssl_ca_certs" $s.tls_ca_certs }}{{ end }}
{{- $cfg := dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $app) }}
{{- toYaml $cfg }}
{{- end }}

{{/* Volumes of the model storage (for pod specs; empty for type none). */}}
{{- define "twotower.modelVolumes" -}}
{{- $m := .Values.modelStorage }}
{{- if eq $m.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-model" (include "twotower.fullname" .)) $m.pvc.existingClaim }}
    readOnly: true
{{- else if eq $m.type "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    {{- with $m.hostPath.type }}
    type: {{ . }}
    {{- end }}
{{- else if eq $m.type "init" }}
- name: model
  emptyDir:
    {{- if $m.init.medium }}
    medium: {{ $m.init.medium }}
    {{- end }}
    sizeLimit: {{ $m.init.sizeLimit }}
{{- if $m.init.sourceVolume }}
- name: model-source
  {{- toYaml $m.init.sourceVolume | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "twotower.modelVolumeMounts" -}}
{{- if ne .Values.modelStorage.type "none" }}
- name: model
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The init container that fills the model emptyDir (modelStorage.type init). */}}
{{- define "twotower.modelInitContainer" -}}
{{- $m := .Values.modelStorage }}
{{- $i := $m.init }}
- name: model-fetch
  image: {{ if $i.image.repository }}{{ printf "%s:%s" $i.image.repository (default "latest" $i.image.tag) }}{{ else }}{{ include "twotower.image" . }}{{ end }}
  imagePullPolicy: {{ $i.image.pullPolicy }}
  {{- if $i.command }}
  command:
    {{- toYaml $i.command | nindent 4 }}
  {{- else }}
  command: ["sh", "-c", "cp -R \"$SOURCE_DIR\"/. \"$MODEL_DIR\"/ && ls -l \"$MODEL_DIR\""]
  {{- end }}
  {{- with $i.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - name: MODEL_DIR
      value: {{ $m.mountPath | quote }}
    - name: MODEL_SOURCE
      value: {{ $i.sourceUrl | quote }}
    - name: SOURCE_DIR
      value: /model-source
    {{- with $i.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $i.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model
      mountPath: {{ $m.mountPath }}
    {{- if $i.sourceVolume }}
    - name: model-source
      mountPath: /model-source
      readOnly: true
    {{- end }}
  {{- with $i.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end }}
