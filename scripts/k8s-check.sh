#!/usr/bin/env bash
# Renders every Kubernetes overlay under deploys/k8s/overlays (kubectl kustomize) and
# validates the result against the Kubernetes schemas (kubernetes-validate --strict,
# installed from PyPI into target/k8s-venv on first use), then checks what the schemas
# cannot: no cluster-wide rights, probes and resource limits on every container that
# serves. Needs kubectl (with kustomize) and the guests (scripts/build.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

KUBE_VERSIONS=${KUBE_VERSIONS:-"1.31.0 1.35.0"}
VENV=target/k8s-venv
OUT=target/k8s-rendered

command -v kubectl >/dev/null || { echo "k8s-check.sh: kubectl is missing" >&2; exit 1; }
if [[ ! -x $VENV/bin/kubernetes-validate ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q kubernetes-validate
fi

rm -rf "$OUT"
mkdir -p "$OUT"
failed=0
for dir in deploys/k8s/overlays/*/; do
  name=$(basename "$dir")
  file="$OUT/$name.yaml"
  ok=1
  # The guests are build outputs outside the overlay directories.
  kubectl kustomize --load-restrictor LoadRestrictionsNone "$dir" >"$file"
  for v in $KUBE_VERSIONS; do
    if ! "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$file"; then
      echo "k8s-check.sh: $name does not validate against Kubernetes $v" >&2
      ok=0
    fi
  done
  if ! "$VENV/bin/python" - "$file" <<'PY'; then
import sys, yaml
problems = []
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc:
        continue
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind in ("ClusterRole", "ClusterRoleBinding"):
        problems.append(f"{kind} {name}: no cluster-wide rights")
    if kind == "Role":
        for rule in doc["rules"]:
            if set(rule["verbs"]) - {"get", "list", "watch"} or rule["resources"] != ["pods"]:
                problems.append(f"Role {name}: more than get/list/watch on pods: {rule}")
    if kind in ("StatefulSet", "Job"):
        spec = doc["spec"]["template"]["spec"]
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{kind} {name}: not runAsNonRoot")
        for c in spec["containers"]:
            if "limits" not in c.get("resources", {}) or "requests" not in c["resources"]:
                problems.append(f"{kind} {name}/{c['name']}: no resource requests and limits")
            if kind == "StatefulSet" and not ("readinessProbe" in c and "livenessProbe" in c):
                problems.append(f"{kind} {name}/{c['name']}: no readiness and liveness probes")
for p in problems:
    print("k8s-check.sh:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
    echo "k8s-check.sh: $name breaks a deployment rule" >&2
    ok=0
  fi
  if ((ok)); then
    echo "$name: $(grep -c '^kind:' "$file") objects, valid for Kubernetes $KUBE_VERSIONS"
  else
    failed=1
  fi
done
exit "$failed"
