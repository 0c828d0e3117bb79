#!/usr/bin/env bash
# Renders deploy/ (kustomize) and charts/statekeeper (Helm's own SDK, offline) and validates them,
# plus examples/, against Kubernetes schemas (kubernetes-validate); StateStores are validated
# against our generated CRD (tests/manifests.rs evaluates its CEL rules); the chart must lint
# cleanly and grant the same RBAC as deploy/.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kubectl >/dev/null 2>&1; then
  echo "SKIPPED manifest rendering: kubectl is not installed" >&2
  exit 0
fi
python=$(scripts/python-env.sh kubernetes-validate helm-python-sdk jsonschema pyyaml)

rendered=$(mktemp --suffix=.yaml)
trap 'rm -f "$rendered"' EXIT
kubectl kustomize deploy/ > "$rendered"
"$python" - "$rendered" crds examples/*.yaml examples/*/*.yaml <<'PY'
import sys, yaml, jsonschema, kubernetes_validate, helm_python as helm

rendered, _crd_dir, *examples = sys.argv[1:]
chart_dir = "charts/statekeeper"
import glob
schemas = {}
for path in glob.glob("crds/*.statekeeper.dev.yaml"):
    crd = yaml.safe_load(open(path))
    schemas[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
failures = 0
checked = 0
for path in [rendered, *examples]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        name = f'{path}: {doc["kind"]}/{doc["metadata"]["name"]}'
        try:
            if doc["apiVersion"].startswith("statekeeper.dev/"):
                jsonschema.validate(doc, schemas[doc["kind"]])
            else:
                kubernetes_validate.validate(doc, "1.34", strict=True)
            checked += 1
        except Exception as e:  # report every failure, then fail once
            failures += 1
            print(f"INVALID {name}: {str(e).splitlines()[0]}")
def rules_of(docs):
    role = next(d for d in docs if d and d["kind"] == "ClusterRole")
    return sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"])

lint = helm.lint(chart_dir, strict=True, kube_version="v1.34.0")
problems = [m for m in lint["messages"] if m["severity"] >= 2] + lint["errors"]
for p in problems:
    failures += 1
    print(f"LINT {chart_dir}: {p}")
# values.schema.json refuses wrong types and unknown keys.
for wrong in ({"replicaCount": "two"}, {"leaderElection": {"enabled": "yes"}}, {"maxDbConnections": 0}, {"replicas": 2}):
    refused = helm.lint(chart_dir, values=wrong, strict=True, kube_version="v1.34.0")
    if not (refused["errors"] or [m for m in refused["messages"] if m["severity"] >= 2]):
        failures += 1
        print(f"SCHEMA {chart_dir}: values {wrong} were accepted")
with helm.Chart.load(chart_dir) as chart:
    import glob, os
    committed = {os.path.basename(f): open(f).read() for f in glob.glob("crds/*.statekeeper.dev.yaml")}
    if {os.path.basename(c["name"]): c["data"] for c in chart.crds} != committed:
        failures += 1
        print(f"STALE {chart_dir}/crds: copy crds/*.statekeeper.dev.yaml into it")
    backups = {"backupVolume": {"mountPath": "/backups", "volume": {"persistentVolumeClaim": {"claimName": "statekeeper-backups"}}}}
    everything = {"metrics": {"serviceMonitor": {"enabled": True}}, "networkPolicy": {"enabled": True}, "grafanaDashboard": {"enabled": True}}
    for values in ({}, {"watchNamespace": "data", "serviceAccount": {"create": False, "name": "existing"}}, backups, everything, {"replicaCount": 1, "leaderElection": {"enabled": False}}):
        out = chart.render(values, name="statekeeper", namespace="statekeeper-system", is_install=True)
        docs = [d for name, text in out.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
        kinds = {d["kind"] for d in docs}
        expected = {"PodDisruptionBudget"} if values.get("replicaCount", 2) > 1 else set()
        if values is everything:
            expected |= {"ServiceMonitor", "Service", "NetworkPolicy", "ConfigMap"}
        if not expected <= kinds or ("PodDisruptionBudget" in kinds and values.get("replicaCount", 2) == 1):
            failures += 1
            print(f"chart with {values} renders {sorted(kinds)}, expected {sorted(expected)}")
        args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        if ("--leader-elect" in args) != values.get("leaderElection", {}).get("enabled", True):
            failures += 1
            print(f"chart with {values}: --leader-elect is {'--leader-elect' in args}")
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                import json
                json.loads(doc["data"]["statekeeper.json"])
            if doc["kind"] == "ServiceMonitor":
                checked += 1
                continue
            try:
                kubernetes_validate.validate(doc, "1.34", strict=True)
                checked += 1
            except Exception as e:
                failures += 1
                print(f"INVALID chart {doc['kind']}/{doc['metadata']['name']} {values}: {str(e).splitlines()[0]}")
        if rules_of(docs) != rules_of(yaml.safe_load_all(open("deploy/rbac.yaml"))):
            failures += 1
            print("RBAC of charts/statekeeper differs from deploy/rbac.yaml")
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        if values.get("watchNamespace") and "--namespace=data" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]:
            failures += 1
            print("chart ignores watchNamespace")
        pod = deployment["spec"]["template"]["spec"]
        mounted = [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])]
        claims = [v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])]
        if values.get("backupVolume") and (mounted != ["/backups"] or claims != ["statekeeper-backups"]):
            failures += 1
            print(f"chart ignores backupVolume: mounts {mounted}, claims {claims}")
        if not values.get("backupVolume") and (mounted or claims):
            failures += 1
            print("chart mounts a backup volume nobody asked for")

print(f"manifests: {checked} passed, {failures} failed")
sys.exit(1 if failures else 0)
PY
