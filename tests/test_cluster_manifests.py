"""The KubeRay manifests of cluster/: each Ray resource against the schema of KubeRay's
CRD (when the CRDs are at hand), the Kubernetes objects' required fields by hand, and
everything the manifests tell raytron (config keys, serving arguments, versions, where
MLflow is) against raytron itself. Nothing here needs a Kubernetes cluster."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# KubeRay v1.7's CustomResourceDefinitions, beside the repository (not part of it)
CRDS = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
CORE_API_VERSIONS = {"Deployment": "apps/v1", "Service": "v1", "PersistentVolumeClaim": "v1",
                     "Secret": "v1"}
SHARED_MOUNT = "/mnt/raytron"
RAY_DRAIN_DEFAULT_S = 30.0  # Ray's RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S when unset
GPU = "nvidia.com/gpu"


def load_documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(CLUSTER.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


DOCUMENTS = load_documents()


def named(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def of_kind(*kinds: str) -> list[dict]:
    return [doc for _, doc in DOCUMENTS if doc["kind"] in kinds]


def only(kind: str) -> dict:
    (doc,) = of_kind(kind)
    return doc


def each(*kinds: str):
    """Parametrize a test over the documents of these kinds, named by kind and name."""
    docs = of_kind(*kinds)
    assert docs, f"cluster/ holds no {' or '.join(kinds)}"
    return pytest.mark.parametrize("doc", docs, ids=named)


def cluster_spec(doc: dict) -> dict:
    """The RayClusterSpec of a RayCluster, RayJob or RayService."""
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(group, pod template) of every pod the document makes; group 'head' for a head."""
    if doc["kind"] == "Deployment":
        return [("deployment", doc["spec"]["template"])]
    if doc["kind"] not in CRD_FILES:
        return []
    spec = cluster_spec(doc)
    return [("head", spec["headGroupSpec"]["template"])] + [
        (group["groupName"], group["template"]) for group in spec.get("workerGroupSpecs", [])]


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def gpus(container: dict) -> tuple[object, object]:
    resources = container.get("resources", {})
    return resources.get("requests", {}).get(GPU), resources.get("limits", {}).get(GPU)


def env_value(container: dict, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def test_every_document_is_a_known_named_kind():
    assert DOCUMENTS
    for file, doc in DOCUMENTS:
        assert doc["kind"] in CRD_FILES or doc["kind"] in CORE_API_VERSIONS, (file, doc["kind"])
        assert doc.get("metadata", {}).get("name"), f"{file}: a {doc['kind']} without a name"
    names = [named(doc) for _, doc in DOCUMENTS if doc["kind"] != "PersistentVolumeClaim"]
    assert len(names) == len(set(names)), names  # the same PVC may be in several files


# -- Ray resources against KubeRay's CRDs ---------------------------------------------------


def closed(node):
    """The schema with unknown fields refused, as `kubectl apply` (strict field validation)
    refuses them where the API server would otherwise drop them: an object schema that
    lists its properties takes no others, unless it keeps unknown fields."""
    if isinstance(node, list):
        return [closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: ({name: closed(sub) for name, sub in value.items()} if key == "properties"
                 else closed(value)) for key, value in node.items()}
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(kind: str) -> dict:
    """The openAPIV3Schema of the kind's ray.io/v1 version (the API server checks it)."""
    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay's CRDs are not at {CRDS}")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return closed(version["schema"]["openAPIV3Schema"])


@each(*CRD_FILES)
def test_ray_resource_matches_the_kuberay_crd(doc):
    import jsonschema

    assert doc["apiVersion"] == "ray.io/v1"  # the CRD schema does not check these
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"]))
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in validator.iter_errors(doc)]
    assert not problems, "\n".join(problems)


@each(*CRD_FILES)
def test_ray_cluster_follows_the_operators_rules(doc):
    """Rules the operator checks when it reconciles, beyond the CRD's schema (a broken
    one shows only as an event on the resource)."""
    spec = cluster_spec(doc)
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) \
            <= group["maxReplicas"], group["groupName"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        # Ray's resources come from rayStartParams or from `resources`, never both.
        start = group.get("rayStartParams", {})
        assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory"} & set(start))
        if spec.get("autoscalerOptions", {}).get("version") == "v2":
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never"
    if spec.get("authOptions", {}).get("mode") == "token":  # Ray's token auth: Ray >= 2.52
        assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52)
    if doc["kind"] == "RayJob" and doc["spec"].get("ttlSecondsAfterFinished"):
        assert doc["spec"]["shutdownAfterJobFinishes"]


# -- Kubernetes core objects, by hand ---------------------------------------------------------


def test_core_objects_have_their_required_fields():
    for doc in of_kind(*CORE_API_VERSIONS):
        assert doc["apiVersion"] == CORE_API_VERSIONS[doc["kind"]], named(doc)
    for doc in of_kind("Deployment"):
        spec = doc["spec"]
        selector = spec["selector"]["matchLabels"]
        labels = spec["template"]["metadata"]["labels"]
        assert selector and selector.items() <= labels.items(), named(doc)
        for container in containers(spec["template"]):
            assert container["name"] and container["image"], named(doc)
    for doc in of_kind("Service"):
        assert doc["spec"]["selector"], named(doc)
        for port in doc["spec"]["ports"]:
            assert isinstance(port["port"], int), named(doc)
        assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"  # nothing exposed outside
    for doc in of_kind("PersistentVolumeClaim"):
        assert doc["spec"]["accessModes"], named(doc)
        assert doc["spec"]["resources"]["requests"]["storage"], named(doc)


def selected_by(service: dict) -> list[dict]:
    """The Deployments whose pods the Service sends its traffic to."""
    return [d for d in of_kind("Deployment") if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()]


def test_services_select_pods_that_exist():
    for service in of_kind("Service"):
        selected = selected_by(service)
        assert selected, named(service)
        ports = {p.get("name") for d in selected for c in containers(d["spec"]["template"])
                 for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports | {port["port"]}


def test_every_claimed_volume_is_defined():
    claims = {doc["metadata"]["name"]: doc for doc in of_kind("PersistentVolumeClaim")}
    for _, doc in DOCUMENTS:
        for group, template in pod_templates(doc):
            for volume in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert claim in claims, f"{named(doc)} {group}: no PVC {claim}"


# -- what the pods need ------------------------------------------------------------------------


@each(*CRD_FILES, "Deployment")
def test_gpu_containers_ask_for_what_they_use(doc):
    """Kubernetes refuses extended resources whose request differs from their limit."""
    for group, template in pod_templates(doc):
        for container in containers(template):
            requested, limited = gpus(container)
            assert requested == limited, f"{named(doc)} {group}: {GPU} {requested} != {limited}"
    if doc["kind"] in CRD_FILES:  # raytron's workers: one per GPU
        for group, template in pod_templates(doc)[1:]:
            assert gpus(containers(template)[0])[1], f"{named(doc)} {group}: no GPU"


@each(*CRD_FILES)
def test_ray_pods_outlast_rays_drain_and_have_shared_memory(doc):
    """A deleted pod's `ray start` drains the node (the preemption notice raytron
    checkpoints on) for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S; Kubernetes must not
    kill the pod before. GPU workers need a /dev/shm larger than Docker's 64 MB."""
    for group, template in pod_templates(doc):
        container = containers(template)[0]
        drain = float(env_value(container, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S")
                      or RAY_DRAIN_DEFAULT_S)
        grace = template["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace > max(60, drain), f"{named(doc)} {group}: grace {grace} s, drain {drain} s"
        if group != "head":
            shm = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            assert shm and volumes[shm[0]].get("emptyDir", {}).get("medium") == "Memory", group


@each(*CRD_FILES)
def test_ray_pods_share_the_run_volume_and_know_mlflow(doc):
    claims = {d["metadata"]["name"]: d for d in of_kind("PersistentVolumeClaim")}
    for group, template in pod_templates(doc):
        container = containers(template)[0]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == SHARED_MOUNT]
        claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
        assert "ReadWriteMany" in claim["spec"]["accessModes"], group  # every pod writes
        assert env_value(container, "MLFLOW_TRACKING_URI"), f"{named(doc)} {group}"


def mlflow_uris() -> list[str]:
    """Every MLflow address the manifests give raytron: env, entrypoint, serve args."""
    uris = [env_value(c, "MLFLOW_TRACKING_URI") for _, doc in DOCUMENTS
            for _, template in pod_templates(doc) for c in containers(template)]
    uris += [o.split("=", 1)[1] for o in entrypoint_overrides()[1] if o.startswith("tracking.")]
    uris.append(serve_application()["args"]["tracking_uri"])
    return [u for u in uris if u]


def test_mlflow_addresses_reach_the_mlflow_service():
    """...by its name and port, with a Host header that MLflow's --allowed-hosts lets
    through (by default MLflow answers only requests to localhost)."""
    services = {doc["metadata"]["name"]: doc for doc in of_kind("Service")}
    for uri in mlflow_uris():
        address = urlsplit(uri)
        service = services[address.hostname]
        assert address.port in [p["port"] for p in service["spec"]["ports"]], uri
        (server,) = selected_by(service)
        command = containers(server["spec"]["template"])[0]["command"]
        (allowed,) = [a.split("=", 1)[1] for a in command if a.startswith("--allowed-hosts=")]
        assert any(fnmatch.fnmatch(address.netloc, pattern) if "*" in pattern
                   else address.netloc == pattern for pattern in allowed.split(",")), uri


# -- the image ------------------------------------------------------------------------------


def pinned(requirement: str) -> str:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in dependencies if re.match(rf"{requirement}(\[.*\])?==", d)]
    return pin.split("==")[1]


def test_image_and_clusters_run_the_ray_and_torch_raytron_pins():
    ray_version = importlib.metadata.version("ray")
    assert ray_version == pinned("ray")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert base.startswith(f"rayproject/ray:{ray_version}-") and base.endswith("-gpu"), base
    assert re.search(rf"pip install .*torch=={re.escape(pinned('torch'))}\s.*--index-url",
                     dockerfile), "the Dockerfile must install the pinned CUDA torch"
    assert not re.search(r"^USER\s+root", dockerfile, re.MULTILINE)
    for doc in of_kind(*CRD_FILES):
        assert cluster_spec(doc)["rayVersion"] == ray_version, named(doc)


# -- what the manifests tell raytron ------------------------------------------------------------


def entrypoint_overrides(command: str | None = None) -> tuple[str, list[str]]:
    """(config, overrides) of a `raytron train CONFIG key=value ...` command; the
    RayJob's entrypoint by default."""
    words = shlex.split(command or only("RayJob")["spec"]["entrypoint"])
    assert words[:2] == ["raytron", "train"], words
    return words[2], words[3:]


def readme_train_commands() -> list[str]:
    """The `raytron train` commands cluster/README.md submits to a cluster."""
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    return re.findall(r"-- (raytron train [^\n]*)", text)


@pytest.mark.parametrize("command", [None, *readme_train_commands()],
                         ids=lambda c: "rayjob" if c is None else c.split()[2])
def test_submitted_runs_are_valid_configs(command):
    from raytron.platform.config.load import load_config
    from raytron.platform.config.validate import validate

    name, overrides = entrypoint_overrides(command)
    assert all("=" in o for o in overrides), overrides
    config = load_config(name, overrides)
    validate(config, check_paths=False)  # the paths exist on the cluster's volume only
    assert config.run.root.startswith(SHARED_MOUNT)  # where every pod finds the run


def serve_application() -> dict:
    (application,) = yaml.safe_load(only("RayService")["spec"]["serveConfigV2"])["applications"]
    return application


def test_rayservice_serves_raytrons_application():
    from ray.serve.schema import ServeDeploySchema

    from raytron.platform.serving.app import ModelServer, ServeArgs

    ServeDeploySchema.model_validate(yaml.safe_load(only("RayService")["spec"]["serveConfigV2"]))
    application = serve_application()
    module, attribute = application["import_path"].split(":")
    assert application["import_path"] == "raytron.platform.serving.app:application"
    assert callable(getattr(importlib.import_module(module), attribute))
    assert application["route_prefix"] == "/"
    args = application["args"]
    assert set(args) <= set(ServeArgs.model_fields), set(args) - set(ServeArgs.model_fields)
    ServeArgs(**args)  # the types Serve's builder will check
    assert args["source"].startswith(SHARED_MOUNT)
    for deployment in application.get("deployments", []):
        assert deployment["name"] == ModelServer.name  # Serve refuses unknown deployments
