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
{{- toYaml $env -}}
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
