"""Validates the custom resources in deploy/kubernetes against the schemas in schemas/
(kubernetes-validate knows only built-in kinds and merely warns on a CRD).
Usage: python3 validate-crds.py FILE... ; exit 1 on the first invalid document."""
import json
import pathlib
import sys

import jsonschema
import yaml

SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}
here = pathlib.Path(__file__).parent
failed = False
for name in sys.argv[1:]:
    for doc in yaml.safe_load_all(pathlib.Path(name).read_text()):
        if not doc:
            continue
        schema = SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is None:
            continue
        validator = jsonschema.Draft7Validator(json.loads((here / "schemas" / schema).read_text()))
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        for e in errors:
            failed = True
            print(f"ERROR {name}: {doc['kind']}/{doc['metadata'].get('name')}: {'.'.join(map(str, e.path)) or '(root)'}: {e.message}")
        if not errors:
            print(f"INFO {name} passed for {doc['kind']}/{doc['metadata'].get('name')} against schemas/{schema}")
sys.exit(1 if failed else 0)
