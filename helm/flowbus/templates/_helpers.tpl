{{/*
Names. The full name is at most 40 characters: the RayCluster carries it, and KubeRay names the
head Service "<RayCluster>-head-svc", shortening anything longer than 50 characters, which would
break the address the controller is given.
*/}}
{{- define "flowbus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "flowbus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "flowbus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flowbus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowbus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "flowbus.labels" -}}
helm.sh/chart: {{ include "flowbus.chart" . }}
{{ include "flowbus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flowbus
{{- end -}}

{{- define "flowbus.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "flowbus.brokerName" -}}
{{- printf "%s-broker" (include "flowbus.fullname" .) -}}
{{- end -}}

{{- define "flowbus.configName" -}}
{{- printf "%s-config" (include "flowbus.fullname" .) -}}
{{- end -}}

{{- define "flowbus.rayClusterName" -}}
{{- include "flowbus.fullname" . -}}
{{- end -}}

{{/*
The Secret with the Ray token (key auth_token): ray.auth.secretName, else the one KubeRay
generates for the RayCluster, named like it (utils.CheckName: at most 50 characters, which
ours always is, and a leading digit replaced by "r").
*/}}
{{- define "flowbus.rayAuthSecret" -}}
{{- .Values.ray.auth.secretName | default (regexReplaceAll "^[0-9]" (include "flowbus.rayClusterName" .) "r") -}}
{{- end -}}

{{/*
RAY_AUTH_MODE and RAY_AUTH_TOKEN for a container that runs Ray or joins it (the Ray head and
workers, where KubeRay injects the same two and keeps ours, and the controller); nothing when
ray.auth.mode is "disabled".
*/}}
{{- define "flowbus.rayAuthEnv" -}}
{{- if eq .Values.ray.auth.mode "token" }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "flowbus.rayAuthSecret" . }}
      key: auth_token
{{- end }}
{{- end -}}

{{- define "flowbus.curveSecret" -}}
{{- .Values.curve.secretName | default (printf "%s-curve" (include "flowbus.fullname" .)) -}}
{{- end -}}

{{/* The Secret with the sessions' source-grant key (key grant.key). */}}
{{- define "flowbus.grantSecret" -}}
{{- .Values.bus.grantSecretName | default (printf "%s-grant" (include "flowbus.fullname" .)) -}}
{{- end -}}

{{/* The grant key's volume (owner-read only), in the broker and every client pod. */}}
{{- define "flowbus.grantVolume" -}}
- name: flowbus-grant
  secret:
    secretName: {{ include "flowbus.grantSecret" . }}
    defaultMode: 0400
    items:
      - key: grant.key
        path: grant.key
{{- end -}}

{{/* The broker's Service as seen from any pod of the namespace. */}}
{{- define "flowbus.brokerHost" -}}
{{- printf "%s.%s.svc" (include "flowbus.brokerName" .) .Release.Namespace -}}
{{- end -}}

{{/* FLOWBUS_ADDRESS: the broker's request endpoint. */}}
{{- define "flowbus.brokerAddress" -}}
{{- printf "tcp://%s:%d" (include "flowbus.brokerHost" .) (int64 .Values.bus.requestPort) -}}
{{- end -}}

{{/* The Ray client address of the head Service KubeRay creates. */}}
{{- define "flowbus.rayAddress" -}}
{{- printf "ray://%s-head-svc.%s.svc:10001" (include "flowbus.rayClusterName" .) .Release.Namespace -}}
{{- end -}}

{{/*
The [bus] table. Argument: dict "root" $ "host" <bind or connect host> "broker" <bool>.
The broker binds every interface of its pod, which flowbus allows only with CurveZMQ; clients
read the broker's public key and (optionally) their own client key pair; only the broker pod's
file names (and only that pod mounts) the broker's secret key.
*/}}
{{- define "flowbus.busToml" -}}
{{- $v := .root.Values -}}
{{- $key := $v.curve.keyName -}}
{{- $ckey := $v.curve.clientKeyName -}}
# written by the flowbus chart
[bus]
# pods reach the broker over the network: TCP (with CurveZMQ), not ipc sockets in a local state dir
transport = "tcp"
host = {{ .host | toJson }}
request-port = {{ int64 $v.bus.requestPort }}
publish-port = {{ int64 $v.bus.publishPort }}
ingest-port = {{ int64 $v.bus.ingestPort }}
command-port = {{ int64 ($v.bus.commandPort | default 7753) }}
# the key that signs sessions' source grants (mounted from the grant Secret in every flowbus pod)
grant-key-file = "/etc/flowbus/grant/grant.key"
journal-events = {{ int64 $v.bus.journalEvents }}
max-frame-bytes = {{ int64 $v.bus.maxFrameBytes }}
heartbeat-interval = {{ float64 $v.bus.heartbeatInterval | toString }}
publisher-timeout = {{ float64 $v.bus.publisherTimeout | toString }}
{{- if .broker }}
journal-dir = "/var/lib/flowbus/journal"
journal-fsync = {{ $v.bus.journalFsync | toJson }}
journal-fsync-interval = {{ float64 $v.bus.journalFsyncInterval | toString }}
{{- end }}

[bus.curve]
{{- if .broker }}
server-secret-key-file = {{ printf "/etc/flowbus/curve/%s.key_secret" $key | toJson }}
{{- if $v.curve.clientSecretName }}
authorized-keys-dir = "/etc/flowbus/clients"
{{- end }}
{{- else }}
server-public-key-file = {{ printf "/etc/flowbus/curve/%s.key" $key | toJson }}
{{- if $v.curve.clientSecretName }}
client-secret-key-file = {{ printf "/etc/flowbus/client/%s.key_secret" $ckey | toJson }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The user's `config` with the chart's [ray] key rebalance-per-second (ray.rebalancePerSecond):
added right under the user's [ray] header, or in a [ray] table of its own at the end.
*/}}
{{- define "flowbus.userConfig" -}}
{{- $config := .Values.config | trimSuffix "\n" -}}
{{- $line := printf "rebalance-per-second = %s  # written by the flowbus chart (ray.rebalancePerSecond)" (float64 .Values.ray.rebalancePerSecond | toString) -}}
{{- $header := "(?m)^[ \\t]*\\[[ \\t]*\"?ray\"?[ \\t]*\\][ \\t]*(#.*)?$" -}}
{{- if regexMatch $header $config -}}
{{- regexReplaceAll $header $config (printf "${0}\n%s" $line) -}}
{{- else -}}
{{- printf "%s\n\n[ray]\n%s" $config $line -}}
{{- end -}}
{{- end -}}

{{/* Environment of every flowbus client pod (Ray head, Ray workers, controller). */}}
{{- define "flowbus.clientEnv" -}}
- name: FLOWBUS_ADDRESS
  value: {{ include "flowbus.brokerAddress" . | quote }}
- name: FLOWBUS_STATE_DIR
  value: /var/lib/flowbus/state
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end -}}

{{/* Volume mounts of every flowbus client pod. */}}
{{- define "flowbus.clientMounts" -}}
- name: flowbus-config
  mountPath: /etc/flowbus/flowbus.toml
  subPath: flowbus.toml
  readOnly: true
- name: flowbus-curve
  mountPath: /etc/flowbus/curve
  readOnly: true
{{- if .Values.curve.clientSecretName }}
- name: flowbus-client-key
  mountPath: /etc/flowbus/client
  readOnly: true
{{- end }}
- name: flowbus-grant
  mountPath: /etc/flowbus/grant
  readOnly: true
- name: flowbus-state
  mountPath: /var/lib/flowbus/state
{{- end -}}

{{/* Volumes of every flowbus client pod: the config, the broker's PUBLIC key only, state. */}}
{{- define "flowbus.clientVolumes" -}}
- name: flowbus-config
  configMap:
    name: {{ include "flowbus.configName" . }}
    items:
      - key: flowbus.toml
        path: flowbus.toml
- name: flowbus-curve
  secret:
    secretName: {{ include "flowbus.curveSecret" . }}
    items:
      - key: {{ printf "%s.key" .Values.curve.keyName }}
        path: {{ printf "%s.key" .Values.curve.keyName }}
{{ include "flowbus.grantVolume" . }}
{{- if .Values.curve.clientSecretName }}
- name: flowbus-client-key
  secret:
    secretName: {{ .Values.curve.clientSecretName }}
    items:
      - key: {{ printf "%s.key" .Values.curve.clientKeyName }}
        path: {{ printf "%s.key" .Values.curve.clientKeyName }}
      - key: {{ printf "%s.key_secret" .Values.curve.clientKeyName }}
        path: {{ printf "%s.key_secret" .Values.curve.clientKeyName }}
{{- end }}
- name: flowbus-state
  emptyDir: {}
{{- end -}}

{{/* Checks the schema cannot express; each failure names the value's path. */}}
{{- define "flowbus.validate" -}}
{{- if or (regexMatch "(?m)^[ \\t]*\\[+[ \\t]*\"?bus\"?[ \\t]*[\\].]" .Values.config) (regexMatch "(?m)^[ \\t]*\"?bus\"?[ \\t]*[.=]" .Values.config) -}}
{{- fail "config: must not set the [bus] table; the chart writes it from the values bus.* and curve.*" -}}
{{- end -}}
{{- if regexMatch "(?m)^[ \\t]*(\"?ray\"?[ \\t]*\\.[ \\t]*)?\"?rebalance-per-second\"?[ \\t]*=" .Values.config -}}
{{- fail "config: must not set rebalance-per-second; the chart writes it into [ray] from the value ray.rebalancePerSecond" -}}
{{- end -}}
{{- if regexMatch "(?m)^[ \\t]*\"?ray\"?[ \\t]*[.=]" .Values.config -}}
{{- fail "config: write the ray settings under a [ray] table header, not as ray.KEY = or ray = {...}: the chart adds rebalance-per-second to that table" -}}
{{- end -}}
{{- $ports := list (int64 .Values.bus.requestPort) (int64 .Values.bus.publishPort) (int64 .Values.bus.ingestPort) (int64 (.Values.bus.commandPort | default 7753)) -}}
{{- if ne (len (uniq $ports)) 4 -}}
{{- fail "bus: requestPort, publishPort, ingestPort and commandPort must differ" -}}
{{- end -}}
{{- $gcs := .Values.ray.gcsFaultTolerance -}}
{{- if $gcs.enabled -}}
{{- $_ := required "ray.gcsFaultTolerance.redisAddress is required when ray.gcsFaultTolerance.enabled is true" $gcs.redisAddress -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $g := .Values.ray.workerGroups -}}
{{- if hasKey $seen $g.name -}}
{{- fail (printf "ray.workerGroups[%d].name: %q is already the name of ray.workerGroups[%d]" $i $g.name (get $seen $g.name)) -}}
{{- end -}}
{{- $_ := set $seen $g.name $i -}}
{{- if gt (int64 $g.minReplicas) (int64 $g.maxReplicas) -}}
{{- fail (printf "ray.workerGroups[%d].minReplicas: %d is above maxReplicas %d" $i (int64 $g.minReplicas) (int64 $g.maxReplicas)) -}}
{{- end -}}
{{- if or (lt (int64 $g.replicas) (int64 $g.minReplicas)) (gt (int64 $g.replicas) (int64 $g.maxReplicas)) -}}
{{- fail (printf "ray.workerGroups[%d].replicas: %d is outside minReplicas..maxReplicas (%d..%d)" $i (int64 $g.replicas) (int64 $g.minReplicas) (int64 $g.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
