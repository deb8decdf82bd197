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
for name in ("kafka", "producer", "sluice", "prometheus"):
    if name not in services:
        errors.append(f"docker-compose.yml: no `{name}` service")
kafka_env = services.get("kafka", {}).get("environment", {})
if "KAFKA_PROCESS_ROLES" not in kafka_env:
    errors.append("kafka must run in KRaft mode (KAFKA_PROCESS_ROLES)")
listeners = kafka_env.get("KAFKA_ADVERTISED_LISTENERS", "")
sluice = services.get("sluice", {})
env = sluice.get("environment", {})
brokers = env.get("KAFKA_BROKERS", "")
if not brokers or brokers.split(":")[0] not in listeners:
    errors.append(f"sluice's KAFKA_BROKERS `{brokers}` is not an advertised Kafka listener ({listeners})")
cmd = sluice.get("command", [])
if cmd[:1] != ["run"]:
    errors.append("the sluice service must run a pipeline (`run ...`)")
else:
    pipeline = pathlib.Path(cmd[1].replace("/opt/sluice/", str(root.parent) + "/"))
    if not pipeline.exists():
        errors.append(f"the sluice service runs {cmd[1]}, which the image does not hold ({pipeline})")
    elif "${KAFKA_BROKERS" not in pipeline.read_text():
        errors.append(f"{pipeline} does not read its brokers from $KAFKA_BROKERS")
prod = services.get("producer", {}).get("command", [])
if prod[:1] != ["produce"] or "kafka:9092" not in prod:
    errors.append("the producer service must run `produce --brokers kafka:9092 ...`")
for svc in ("producer", "sluice"):
    dep = services.get(svc, {}).get("depends_on", {})
    if not isinstance(dep, dict) or dep.get("kafka", {}).get("condition") != "service_healthy":
        errors.append(f"{svc} must wait for a healthy kafka")
dockerfile = (root / "Dockerfile").read_text()
for needle in ("libclang-dev", "libssl-dev", "libssl3", "cargo build --release", "ENTRYPOINT", "COPY examples"):
    if needle not in dockerfile:
        errors.append(f"Dockerfile lacks `{needle}`")
ignore_file = root.parent / ".dockerignore"
ignored = ignore_file.read_text().split() if ignore_file.exists() else []
for needle in (".git", "target", "examples/*/lake"):
    if needle not in ignored:
        errors.append(f".dockerignore does not leave out `{needle}` (the build context would carry it)")
prom = yaml.safe_load((root / "prometheus.yml").read_text())
targets = [t for job in prom.get("scrape_configs", []) for sc in job.get("static_configs", []) for t in sc.get("targets", [])]
if not any(t.startswith("sluice:") for t in targets):
    errors.append("prometheus.yml does not scrape sluice")
for e in errors:
    print("docker check:", e, file=sys.stderr)
sys.exit(1 if errors else 0)
