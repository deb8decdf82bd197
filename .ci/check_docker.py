"""Checks docker/ as far as possible without a Docker engine: the compose file
parses and wires the services the README promises, the Dockerfile builds the
binary the compose file runs, and Prometheus scrapes Sluice's /metrics."""
import pathlib
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent / "docker"
compose = yaml.safe_load((root / "docker-compose.yml").read_text())
services = compose.get("services", {})
errors = []
for name in ("kafka", "sluice", "prometheus"):
    if name not in services:
        errors.append(f"docker-compose.yml: no `{name}` service")
kafka_env = services.get("kafka", {}).get("environment", {})
if "KAFKA_PROCESS_ROLES" not in kafka_env:
    errors.append("kafka must run in KRaft mode (KAFKA_PROCESS_ROLES)")
dockerfile = (root / "Dockerfile").read_text()
for needle in ("libclang-dev", "cargo build --release", "ENTRYPOINT"):
    if needle not in dockerfile:
        errors.append(f"Dockerfile lacks `{needle}`")
prom = yaml.safe_load((root / "prometheus.yml").read_text())
targets = [t for job in prom.get("scrape_configs", []) for sc in job.get("static_configs", []) for t in sc.get("targets", [])]
if not any(t.startswith("sluice:") for t in targets):
    errors.append("prometheus.yml does not scrape sluice")
for e in errors:
    print("docker check:", e, file=sys.stderr)
sys.exit(1 if errors else 0)
