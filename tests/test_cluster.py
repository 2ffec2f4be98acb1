"""cluster/*.yaml are what `ray up` accepts (Ray's own schema and config preparation), and every
custom resource the shipped job configs ask for is offered by a node type of every cluster."""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((ROOT / "cluster").glob("*.yaml"))
CLUSTERS = [p for p in CLUSTERS if p.name != "runtime_env.yaml"]
BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


def prepared(path: Path) -> dict:
    """What `ray up` validates: the file merged with the provider's defaults, then Ray's JSON schema."""
    config = prepare_config(copy.deepcopy(yaml.safe_load(path.read_text())))
    validate_config(config)
    return config


def offered_resources(config: dict) -> dict[str, set[str]]:
    """Custom resource names per node type: from `resources` (cloud node types) or from the
    `--resources` flag of the start commands (on-prem clusters have a single node type)."""
    offered = {}
    for name, node_type in config["available_node_types"].items():
        names = set(node_type.get("resources", {}))
        single = len(config["available_node_types"]) == 1  # on-prem: head and workers share the type
        commands = (config["head_start_ray_commands"] if name == config["head_node_type"] else []) + (config["worker_start_ray_commands"] if single or name != config["head_node_type"] else [])
        for flag in re.findall(r"--resources='([^']*)'", " ".join(commands)):
            names |= set(json.loads(flag))
        offered[name] = names - BUILTIN
    return offered


def requested_resources() -> set[str]:
    """Custom resources the shipped job configs put on rollout actors and learner ranks."""
    names = set()
    for path in (ROOT / "jobs" / "configs").glob("nft_*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        names |= set(cfg.get("rollout_resources", {})) | set(cfg.get("train", {}).get("resources_per_worker", {}))
    return names


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_own_validation(path):
    config = prepared(path)
    assert config["head_node_type"] in config["available_node_types"]
    assert config.get("idle_timeout_minutes", 0) > 0
    head_commands = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_commands or path.name == "local.yaml"  # reach it through `ray dashboard`
    for node_type in config["available_node_types"].values():
        assert 0 <= node_type.get("min_workers", 0) <= node_type.get("max_workers", 0) or node_type is config["available_node_types"][config["head_node_type"]]


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_head_runs_no_gpu_work_and_every_requested_resource_is_offered(path):
    config = prepared(path)
    offered = offered_resources(config)
    head = config["available_node_types"][config["head_node_type"]]
    if path.name == "local.yaml":
        assert "--num-gpus=0" in " ".join(config["head_start_ray_commands"])
    else:
        assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 1) == 0
        assert any(t.get("node_config", {}).get("InstanceMarketOptions") or any("preemptible" in s for s in t.get("node_config", {}).get("scheduling", [])) for t in config["available_node_types"].values())
    wanted = requested_resources()
    assert wanted == {"rollout", "learner"}
    for name in wanted:
        assert any(name in names for names in offered.values()), f"{path.name}: no node type offers '{name}'"


def test_a_typo_in_a_custom_resource_is_caught():
    config = prepared(ROOT / "cluster" / "aws.yaml")
    config["available_node_types"]["rollout_gpu"]["resources"] = {"CPU": 8, "GPU": 1, "rolout": 1}
    offered = offered_resources(config)
    assert not any("rollout" in names for names in offered.values())


def test_runtime_env_file_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert env["working_dir"] == "." and {".venv", ".git", "outputs"} <= set(env["excludes"])
    assert "WANDB_API_KEY" in env["env_vars"]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def paths_left_behind(cfg: dict, excludes: list[str]) -> list[str]:
    """The relative paths a job config names (or takes by default, for its rewards' weights) that the
    runtime env does not ship: on a cluster no worker would find them."""
    from fnmatch import fnmatch

    from stitchvm_rl import rewards

    named = _strings(cfg) + list(rewards.weight_sources(cfg.get("rewards", {}), cfg.get("reward_sources")).values())
    relative = [s for s in named if "/" in s and not s.startswith(("/", "~")) and "://" not in s]
    return [s for s in relative if any(fnmatch(Path(s).parts[0], pattern) for pattern in excludes)]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_job_config_names_a_path_the_runtime_env_leaves_behind(path):
    excludes = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["excludes"]
    assert paths_left_behind(yaml.safe_load(path.read_text()), excludes) == []


def test_a_config_naming_an_excluded_path_or_relying_on_default_weights_is_caught():
    excludes = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["excludes"]
    assert paths_left_behind({"value_models": ["outputs/stitch/value_model"]}, excludes) == ["outputs/stitch/value_model"]
    assert paths_left_behind({"rewards": {"hpsv2": 1.0}}, excludes) == ["weights/hpsv2.1"]
    assert paths_left_behind({"rewards": {"hpsv2": 1.0}, "reward_sources": {"hpsv2": "s3://b/hpsv2.1"}}, excludes) == []
    assert paths_left_behind({"backbone": "stabilityai/stable-diffusion-3.5-medium"}, excludes) == []  # a hub id


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_every_cluster_sets_node_death_detection_and_the_object_store_size(path):
    config = yaml.safe_load(path.read_text())
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "RAY_health_check_period_ms=" in head and "RAY_health_check_failure_threshold=" in head  # the GCS (head) decides
    assert "--object-store-memory=" in head and "--object-store-memory=" in workers
