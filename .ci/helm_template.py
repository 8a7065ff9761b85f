#!/usr/bin/env python3
"""`helm template` for CI: renders a chart with the Helm SDK shipped in the helm-python-sdk
wheel (no helm binary is installable here). Checks values.schema.json like helm does.

usage: helm_template.py CHART [-f values.yaml]... [--set key=value]... [--name N] [--namespace NS]
"""
import argparse
import sys

import helm_python as helm

ap = argparse.ArgumentParser()
ap.add_argument("chart")
ap.add_argument("-f", "--values", action="append", default=[])
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--name", default="switchyard")
ap.add_argument("--namespace", default="default")
args = ap.parse_args()


def merge(base, override):
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


user = {}
for path in args.values:
    with open(path) as f:
        merge(user, helm.values_from_yaml(f.read()))
for item in args.set:
    merge(user, helm.parse_set_string(item))
try:
    with helm.Chart.load(args.chart) as chart:
        chart.validate_schema(user)
        out = chart.render(user, name=args.name, namespace=args.namespace, is_install=True)
except helm.HelmError as e:
    sys.exit(f"Error: {e}")
for path in sorted(out):
    body = out[path].strip()
    if not body or path.endswith("NOTES.txt") or "/templates/_" in path:
        continue
    print(f"---\n# Source: {path}\n{body}")
