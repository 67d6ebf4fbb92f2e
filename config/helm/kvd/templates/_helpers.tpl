{{/*
Names, labels, kvd's configuration file, and the checks that refuse values which cannot work.
*/}}

{{- define "kvd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvd.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The kvd pods alone (the example engine pods share the selector labels). */}}
{{- define "kvd.daemonLabels" -}}
{{ include "kvd.selectorLabels" . }}
app.kubernetes.io/component: daemon
{{- end -}}

{{- define "kvd.labels" -}}
{{ include "kvd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kvd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The value of config.<section>.<key>, or "" when unset. */}}
{{- define "kvd.cfg" -}}
{{- $section := index . 0 -}}
{{- $key := index . 1 -}}
{{- $v := dig $section $key "" (index . 2).Values.config -}}
{{- if kindIs "float64" $v -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- end -}}

{{/* One TOML value: strings quoted (JSON escapes are valid TOML), whole numbers without a
fraction, lists as arrays. */}}
{{- define "kvd.tomlValue" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "float64" . -}}
{{- if eq (float64 (int64 .)) . -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if kindIs "slice" . -}}
[{{- range $i, $e := . -}}{{ if $i }}, {{ end }}{{ include "kvd.tomlValue" $e }}{{- end -}}]
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* kvd.toml: the user's config sections plus the keys the chart owns. */}}
{{- define "kvd.configToml" -}}
{{- $gids := concat (dig "server" "allowed_gids" (list) .Values.config) (list (int .Values.runAs.group)) | uniq -}}
{{- $owned := dict
  "server" (dict "socket_path" (printf "%s/kvd.sock" .Values.socketDir) "allowed_gids" $gids)
  "metrics" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port)))
-}}
{{- if .Values.disk.hostPath -}}
{{- $_ := set $owned "disk" (dict "path" "/var/lib/kvd") -}}
{{- end -}}
{{- if .Values.peer.enabled -}}
{{- $peer := dict "listen" (printf "0.0.0.0:%d" (int .Values.peer.port)) "tls" .Values.peer.tls.mode -}}
{{- if eq .Values.peer.tls.mode "mutual" -}}
{{- $_ := set $peer "tls_cert" "/etc/kvd/tls/tls.crt" -}}
{{- $_ := set $peer "tls_key" "/etc/kvd/tls/tls.key" -}}
{{- $_ := set $peer "tls_ca" "/etc/kvd/tls/ca.crt" -}}
{{- end -}}
{{- $_ := set $owned "peer" $peer -}}
{{- end -}}
{{- $merged := mustMergeOverwrite (dict) (deepCopy .Values.config) $owned -}}
{{- range $section := list "server" "ring" "dram" "disk" "index" "events" "peer" "metrics" "gpu" "s3" "log" }}
{{- with (get $merged $section) }}
[{{ $section }}]
{{- range $key, $value := . }}
{{ $key }} = {{ include "kvd.tomlValue" $value }}
{{- end }}
{{ end }}
{{- end }}
{{- end -}}

{{/* A kvd size (bytes, or a number with k/KiB/M/MiB/G/GiB/T/TiB) in MiB, rounded down. */}}
{{- define "kvd.sizeMiB" -}}
{{- $what := index . 0 -}}
{{- $raw := index . 1 -}}
{{- $s := lower (trim (toString $raw)) -}}
{{- if kindIs "float64" $raw -}}{{- $s = toString (int64 $raw) -}}{{- end -}}
{{- if not (regexMatch "^[0-9]+ *(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib)?$" $s) -}}
{{- fail (printf "%s: %q is not a size (try \"1 GiB\")" $what (toString $raw)) -}}
{{- end -}}
{{- $n := int64 (regexFind "^[0-9]+" $s) -}}
{{- $unit := trim (regexReplaceAll "^[0-9]+" $s "") -}}
{{- if has $unit (list "k" "kb" "kib") -}}{{ div $n 1024 }}
{{- else if has $unit (list "m" "mb" "mib") -}}{{ $n }}
{{- else if has $unit (list "g" "gb" "gib") -}}{{ mul $n 1024 }}
{{- else if has $unit (list "t" "tb" "tib") -}}{{ mul $n 1048576 }}
{{- else -}}{{ div $n 1048576 }}
{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity (5Gi, 5120Mi, 6G, 5368709120) in MiB, rounded down. */}}
{{- define "kvd.quantityMiB" -}}
{{- $what := index . 0 -}}
{{- $s := toString (index . 1) -}}
{{- if kindIs "float64" (index . 1) -}}{{- $s = toString (int64 (index . 1)) -}}{{- end -}}
{{- if not (regexMatch "^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$" $s) -}}
{{- fail (printf "%s: %q is not a memory quantity this chart can check (try \"6Gi\")" $what $s) -}}
{{- end -}}
{{- $n := int64 (regexFind "^[0-9]+" $s) -}}
{{- $unit := regexReplaceAll "^[0-9]+" $s "" -}}
{{- if eq $unit "Ki" -}}{{ div $n 1024 }}
{{- else if eq $unit "Mi" -}}{{ $n }}
{{- else if eq $unit "Gi" -}}{{ mul $n 1024 }}
{{- else if eq $unit "Ti" -}}{{ mul $n 1048576 }}
{{- else if eq $unit "k" -}}{{ div (mul $n 1000) 1048576 }}
{{- else if eq $unit "M" -}}{{ div (mul $n 1000000) 1048576 }}
{{- else if eq $unit "G" -}}{{ div (mul $n 1000000000) 1048576 }}
{{- else if eq $unit "T" -}}{{ div (mul $n 1000000000000) 1048576 }}
{{- else -}}{{ div $n 1048576 }}
{{- end -}}
{{- end -}}

{{/* Refuses values that render but cannot work. */}}
{{- define "kvd.checks" -}}
{{- $capacity := include "kvd.cfg" (list "disk" "capacity_bytes" .) -}}
{{- if and $capacity (ne $capacity "0") (not .Values.disk.hostPath) -}}
{{- fail "config.disk.capacity_bytes is set but disk.hostPath is empty: set disk.hostPath to a directory on the node's NVMe filesystem" -}}
{{- end -}}
{{- $arena := include "kvd.sizeMiB" (list "config.dram.arena_bytes" (default "1 GiB" (dig "dram" "arena_bytes" "" .Values.config))) | atoi -}}
{{- $namespaces := int (default 4 (dig "dram" "max_namespaces" 0 .Values.config)) -}}
{{- $arenas := mul $arena $namespaces -}}
{{- $limits := default (dict) .Values.resources.limits -}}
{{- if eq (toString (dig "dram" "huge_pages" "off" .Values.config)) "explicit" -}}
{{- $huge := get $limits "hugepages-2Mi" -}}
{{- if not $huge -}}
{{- fail (printf "config.dram.huge_pages is \"explicit\": set resources.limits.hugepages-2Mi (and the same request) to at least the arenas, %d MiB (arena_bytes x max_namespaces)" $arenas) -}}
{{- end -}}
{{- $hugeMiB := include "kvd.quantityMiB" (list "resources.limits.hugepages-2Mi" $huge) | atoi -}}
{{- if lt $hugeMiB $arenas -}}
{{- fail (printf "resources.limits.hugepages-2Mi (%s = %d MiB) is below the arenas: config.dram.arena_bytes x config.dram.max_namespaces = %d MiB" (toString $huge) $hugeMiB $arenas) -}}
{{- end -}}
{{- else -}}
{{- $memory := get $limits "memory" -}}
{{- if not $memory -}}
{{- fail (printf "resources.limits.memory is not set: kvd's DRAM arenas (%d MiB) are charged to the pod, so set a limit of at least %d MiB" $arenas (add $arenas 256)) -}}
{{- end -}}
{{- $memoryMiB := include "kvd.quantityMiB" (list "resources.limits.memory" $memory) | atoi -}}
{{- if lt $memoryMiB (add $arenas 256) -}}
{{- fail (printf "resources.limits.memory (%s = %d MiB) is below what kvd needs: the arenas, config.dram.arena_bytes x config.dram.max_namespaces = %d MiB, plus 256 MiB; raise the limit or shrink the arenas" (toString $memory) $memoryMiB $arenas) -}}
{{- end -}}
{{- end -}}
{{- $drainMs := int64 (dig "server" "shutdown_drain_ms" 20000 .Values.config) -}}
{{- if lt (mul (int64 .Values.terminationGracePeriodSeconds) 1000) (add $drainMs 5000) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least config.server.shutdown_drain_ms (%d ms) + 5 s, or Kubernetes kills kvd in the middle of its shutdown drain" (int64 .Values.terminationGracePeriodSeconds) $drainMs) -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled -}}
{{- fail "metrics.podMonitor and metrics.serviceMonitor are both enabled: Prometheus would scrape every kvd twice; enable one" -}}
{{- end -}}
{{- if and .Values.peer.enabled (eq .Values.peer.tls.mode "mutual") (not .Values.peer.tls.secretName) -}}
{{- fail "peer.tls.secretName is empty: the data port speaks mutual TLS (peer.tls.mode) and needs a TLS Secret with tls.crt, tls.key and ca.crt (peer.tls.certManager makes one), or peer.tls.mode=off on a network nobody else can reach" -}}
{{- end -}}
{{- if and .Values.peer.tls.certManager.enabled (or (not .Values.peer.tls.certManager.issuerRef.name) (not .Values.peer.tls.certManager.dnsNames)) -}}
{{- fail "peer.tls.certManager needs issuerRef.name (an Issuer of the cluster's CA) and dnsNames (the GPU nodes' names)" -}}
{{- end -}}
{{- if eq (int .Values.peer.port) (int .Values.metrics.port) -}}
{{- if .Values.peer.enabled -}}
{{- fail (printf "peer.port and metrics.port are both %d" (int .Values.peer.port)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
