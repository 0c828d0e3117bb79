#!/usr/bin/env bash
# Renders deploy/ with kustomize and validates it, plus examples/, against Kubernetes schemas
# offline (kubernetes-validate); StateStores are validated against our own generated CRD.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kubectl >/dev/null 2>&1; then
  echo "SKIPPED manifest rendering: kubectl is not installed" >&2
  exit 0
fi
if ! python3 -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  echo "installing kubernetes-validate (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore kubernetes-validate >&2
fi

rendered=$(mktemp --suffix=.yaml)
trap 'rm -f "$rendered"' EXIT
kubectl kustomize deploy/ > "$rendered"
python3 - "$rendered" crds/statestores.statekeeper.dev.yaml examples/*.yaml <<'PY'
import sys, yaml, jsonschema, kubernetes_validate

rendered, crd_file, *examples = sys.argv[1:]
crd = yaml.safe_load(open(crd_file))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
failures = 0
checked = 0
for path in [rendered, *examples]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        name = f'{path}: {doc["kind"]}/{doc["metadata"]["name"]}'
        try:
            if doc["apiVersion"].startswith("statekeeper.dev/"):
                jsonschema.validate(doc, schema)
            else:
                kubernetes_validate.validate(doc, "1.34", strict=True)
            checked += 1
        except Exception as e:  # report every failure, then fail once
            failures += 1
            print(f"INVALID {name}: {str(e).splitlines()[0]}")
print(f"manifests: {checked} passed, {failures} failed")
sys.exit(1 if failures else 0)
PY
