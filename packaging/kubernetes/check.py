#!/usr/bin/python3
"""Validates daemonset.yaml without a cluster (CI): every document parses as YAML and has
apiVersion/kind/metadata.name; the example ConfigMap holds every shipped policy
(policies/*.toml) byte for byte; every policy in either ConfigMap parses as TOML (CI then
runs `oomwake check` on the files this writes to OUTDIR); the mounted policies are all
audit-only; the scrape annotations name the port the agent's --metrics binds, on an
address reachable from outside the pod.

Usage: packaging/kubernetes/check.py OUTDIR
"""

import glob
import os
import sys
import tomllib

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
errors = []


def err(msg):
    errors.append(msg)


def main():
    out = sys.argv[1]
    with open(os.path.join(ROOT, "packaging/kubernetes/daemonset.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    by_name = {}
    for i, d in enumerate(docs):
        for key in ("apiVersion", "kind", "metadata"):
            if key not in d:
                err(f"document {i}: no {key}")
        by_name[(d.get("kind"), d.get("metadata", {}).get("name"))] = d

    examples = by_name.get(("ConfigMap", "oomwake-policy-examples"), {}).get("data", {})
    shipped = {os.path.basename(p): open(p).read()
               for p in sorted(glob.glob(os.path.join(ROOT, "policies/*.toml")))}
    if set(examples) != set(shipped):
        err(f"oomwake-policy-examples has {sorted(examples)}, policies/ has {sorted(shipped)}")
    for name, text in shipped.items():
        if name in examples and examples[name] != text:
            err(f"oomwake-policy-examples/{name} differs from policies/{name}")

    mounted = by_name.get(("ConfigMap", "oomwake-policies"), {}).get("data", {})
    if not mounted:
        err("no ConfigMap oomwake-policies with data")
    for cm, data in (("mounted", mounted), ("examples", examples)):
        d = os.path.join(out, cm)
        os.makedirs(d, exist_ok=True)
        for name, text in data.items():
            try:
                pol = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                err(f"{cm}/{name}: {e}")
                continue
            if cm == "mounted" and pol.get("mode", "enforce") != "audit":
                err(f"mounted policy {name} is not audit-only: applying the manifest would act")
            with open(os.path.join(d, name), "w") as f:
                f.write(text)

    ds = by_name.get(("DaemonSet", "oomwake"))
    if ds is None:
        err("no DaemonSet oomwake")
    else:
        tpl = ds["spec"]["template"]
        ann = tpl["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true":
            err("pod template: prometheus.io/scrape is not \"true\"")
        port = ann.get("prometheus.io/port")
        c = tpl["spec"]["containers"][0]
        args = c.get("args", [])
        metrics = args[args.index("--metrics") + 1] if "--metrics" in args else None
        if metrics is None or metrics.startswith("127.") or metrics.rsplit(":", 1)[-1] != port:
            err(f"--metrics {metrics} does not serve the annotated port {port} beyond loopback")
        ports = [p.get("containerPort") for p in c.get("ports", [])]
        if port is None or int(port) not in ports:
            err(f"annotated port {port} is not a containerPort {ports}")
        if ds["spec"]["selector"]["matchLabels"].items() > tpl["metadata"]["labels"].items():
            err("selector does not match the pod template's labels")
        vols = {v["name"] for v in tpl["spec"].get("volumes", [])}
        for m in c.get("volumeMounts", []):
            if m["name"] not in vols:
                err(f"volumeMount {m['name']} has no volume")

    for e in errors:
        print(f"daemonset.yaml: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"daemonset.yaml: {len(docs)} documents ok; policies written to {out}")


if __name__ == "__main__":
    main()
