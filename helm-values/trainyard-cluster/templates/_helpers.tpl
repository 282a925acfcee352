{{/*
The environment YAML of one entry of .Values.environments, parsed and checked.
Call: include "trainyard.environment" (list $name $cfg) | fromYaml
*/}}
{{- define "trainyard.environment" -}}
{{- $name := index . 0 -}}
{{- $cfg := index . 1 -}}
{{- $text := required (printf "environments.%s.file is empty: pass --set-file environments.%s.file=dags/environments/%s.yaml" $name $name $name) $cfg.file -}}
{{- $env := fromYaml $text -}}
{{- if hasKey $env "Error" -}}
{{- fail (printf "environments.%s.file is not valid YAML: %s" $name $env.Error) -}}
{{- end -}}
{{- if ne (default "" $env.launcher) "kubernetes" -}}
{{- fail (printf "environments.%s: launcher must be kubernetes (got %v)" $name $env.launcher) -}}
{{- end -}}
{{- $k := required (printf "environments.%s.file has no kubernetes section" $name) $env.kubernetes -}}
{{- $_ := required (printf "environments.%s.file: kubernetes.namespace missing" $name) $k.namespace -}}
{{- $_ := required (printf "environments.%s.file: kubernetes.priority_class missing" $name) $k.priority_class -}}
{{- $_ := required (printf "environments.%s.file: kubernetes.service_account missing" $name) $k.service_account -}}
{{- $mode := default "priority" $k.scheduling -}}
{{- if not (has $mode (list "kueue" "priority")) -}}
{{- fail (printf "environments.%s.file: kubernetes.scheduling must be kueue or priority (got %v)" $name $mode) -}}
{{- end -}}
{{- if and $env.teams ($k.secrets | default dict).env_from -}}
{{- fail (printf "environments.%s.file: kubernetes.secrets.env_from is shared by every team; with teams declared each team has its own credentials (teams.<team>.credentials_secret): remove it" $name) -}}
{{- end -}}
{{- if eq $mode "kueue" -}}
{{- if not $env.teams -}}
{{- fail (printf "environments.%s.file: kubernetes.scheduling is kueue but no teams are declared (each team is a ClusterQueue)" $name) -}}
{{- end -}}
{{- if not $k.gpu_types -}}
{{- fail (printf "environments.%s.file: kubernetes.scheduling is kueue but kubernetes.gpu_types is empty (each GPU type is a ResourceFlavor)" $name) -}}
{{- end -}}
{{- end -}}
{{- toYaml $env -}}
{{- end -}}

{{/* Whether an environment (parsed) schedules through Kueue: "true" or "". */}}
{{- define "trainyard.kueue" -}}
{{- if eq (default "priority" .kubernetes.scheduling) "kueue" -}}true{{- end -}}
{{- end -}}

{{/* The ServiceAccount a team's pods run as (EnvironmentConfig.team_service_account). list $team $cfg */}}
{{- define "trainyard.teamServiceAccount" -}}
{{- $team := index . 0 -}}
{{- $t := index . 1 | default dict -}}
{{- $t.service_account | default (printf "trainyard-%s" $team) -}}
{{- end -}}

{{/*
A team's GPUs per GPU type, as EnvironmentConfig.gpu_counts reads them: a bare number needs exactly
one GPU type, a map may omit types (0). Output YAML {type: count}. list $env $team $field $value $k
*/}}
{{- define "trainyard.gpuCounts" -}}
{{- $envName := index . 0 -}}
{{- $team := index . 1 -}}
{{- $field := index . 2 -}}
{{- $value := index . 3 -}}
{{- $k := index . 4 -}}
{{- $types := keys ($k.gpu_types | default dict) | sortAlpha -}}
{{- $counts := dict -}}
{{- if kindIs "map" $value -}}
{{- range $type, $n := $value -}}
{{- if not (has $type $types) -}}
{{- fail (printf "environments.%s.file: teams.%s.%s: unknown GPU type %s; kubernetes.gpu_types has %s" $envName $team $field $type (join ", " $types)) -}}
{{- end -}}
{{- end -}}
{{- range $type := $types -}}
{{- $_ := set $counts $type (get $value $type | default 0) -}}
{{- end -}}
{{- else -}}
{{- if ne (len $types) 1 -}}
{{- fail (printf "environments.%s.file: teams.%s.%s: %v is ambiguous with GPU types %s; write {<gpu_type>: <count>}" $envName $team $field $value (join ", " $types)) -}}
{{- end -}}
{{- $_ := set $counts (first $types) ($value | default 0) -}}
{{- end -}}
{{- range $type, $n := $counts -}}
{{- if or (not (has (kindOf $n) (list "float64" "int" "int64"))) (lt (float64 $n) 0.0) (ne (toString $n) (toString (int64 $n))) -}}
{{- fail (printf "environments.%s.file: teams.%s.%s: %v GPUs of %s is not a whole number >= 0" $envName $team $field $n $type) -}}
{{- end -}}
{{- $_ := set $counts $type (int64 $n) -}}
{{- end -}}
{{- toYaml $counts -}}
{{- end -}}

{{/*
Tolerations as the pod gets them (pydantic's defaults: operator Exists), for a ResourceFlavor.
Output YAML {items: [...]}. Input: the raw list.
*/}}
{{- define "trainyard.tolerations" -}}
{{- $out := list -}}
{{- range $t := . | default list -}}
{{- $item := dict "operator" ($t.operator | default "Exists") -}}
{{- range $field := list "key" "value" "effect" -}}
{{- if and (hasKey $t $field) (not (kindIs "invalid" (index $t $field))) -}}
{{- $_ := set $item $field (index $t $field) -}}
{{- end -}}
{{- end -}}
{{- $out = append $out $item -}}
{{- end -}}
{{- toYaml (dict "items" $out) -}}
{{- end -}}

{{/* host, port and namespace of an in-cluster URL such as http://svc.ns.svc.cluster.local:5000 */}}
{{- define "trainyard.endpoint" -}}
{{- $url := index . 0 -}}
{{- $what := index . 1 -}}
{{- $u := urlParse $url -}}
{{- $hostport := splitList ":" $u.host -}}
{{- $host := first $hostport -}}
{{- $port := "" -}}
{{- if eq (len $hostport) 2 -}}{{- $port = last $hostport -}}{{- else if eq $u.scheme "https" -}}{{- $port = "443" -}}{{- else -}}{{- $port = "80" -}}{{- end -}}
{{- $parts := splitList "." $host -}}
{{- if lt (len $parts) 2 -}}
{{- fail (printf "%s %s: use the in-cluster name <service>.<namespace>.svc... so the NetworkPolicy can find it" $what $url) -}}
{{- end -}}
host: {{ $host | quote }}
port: {{ $port | int }}
namespace: {{ index $parts 1 | quote }}
{{- end -}}

{{- define "trainyard.labels" -}}
app.kubernetes.io/part-of: trainyard
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* A Secret with keys and no values; an existing Secret's data is kept. list $root $ns $name $keys */}}
{{- define "trainyard.secretPlaceholder" -}}
{{- $root := index . 0 -}}
{{- $ns := index . 1 -}}
{{- $name := index . 2 -}}
{{- $keys := index . 3 -}}
{{- $existing := lookup "v1" "Secret" $ns $name -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ $name }}
  namespace: {{ $ns }}
  labels:
    {{- include "trainyard.labels" $root | nindent 4 }}
  annotations:
    helm.sh/resource-policy: keep
    trainyard.io/fill-with: "kubectl -n {{ $ns }} create secret generic {{ $name }}{{ range $keys }} --from-literal={{ . }}=...{{ end }} --dry-run=client -o yaml | kubectl apply -f -"
type: Opaque
{{- if and $existing $existing.data }}
data:
  {{- toYaml $existing.data | nindent 2 }}
{{- else }}
data:
  {{- range $key := $keys }}
  {{ $key }}: ""
  {{- end }}
{{- end }}
{{- end -}}
