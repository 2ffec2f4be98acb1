import dataclasses
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pytest
import yaml

from stitchvm_rl.config import ConfigError, Range, field_docs, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    lr: Annotated[float, Range(0, 1)] = 0.1
    """Learning rate."""
    mode: Literal["a", "b"] = "a"
    """Mode."""


@dataclass
class Outer:
    steps: Annotated[int, Range(1)] = 10
    """Steps."""
    name: str = "run"
    """Name."""
    flag: bool = False
    """Flag."""
    inner: Inner = field(default_factory=Inner)
    """Nested."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weights."""
    tags: list[str] = field(default_factory=list)
    """Tags."""
    maybe: int | None = None
    """Optional."""


def test_overrides_are_typed_and_nested():
    cfg = load_config(Outer, ["steps=3", "inner.lr=1e-4", "inner.mode=b", "weights={x: 2}", "tags=[p, q]", "flag=true", "maybe=4"])
    assert cfg.steps == 3 and cfg.inner.lr == pytest.approx(1e-4) and cfg.inner.mode == "b"
    assert cfg.weights == {"x": 2.0} and isinstance(cfg.weights["x"], float)
    assert cfg.tags == ["p", "q"] and cfg.flag is True and cfg.maybe == 4


@dataclass
class Job:
    inner: Inner = field(default_factory=lambda: Inner(lr=0.5))
    """A section whose defaults the job sets itself."""


def test_a_section_key_keeps_the_jobs_own_defaults_for_the_rest_of_the_section():
    """`inner.mode=b` must not reset inner.lr to Inner's 0.1: the job declared 0.5 (a toy run's lr),
    and --help / docs/configuration.md show that default too."""
    from stitchvm_rl.config import walk_fields

    cfg = load_config(Job, ["inner.mode=b"])
    assert cfg.inner.lr == 0.5 and cfg.inner.mode == "b"
    assert load_config(Job, []).inner.lr == 0.5
    assert {r.key: r.default for r in walk_fields(Job)}["inner.lr"] == 0.5


def test_typo_names_the_key_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'stpes'; did you mean 'steps'\?"):
        load_config(Outer, ["stpes=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.mdoe'; did you mean 'inner.mode'\?"):
        load_config(Outer, ["inner.mdoe=a"])


@pytest.mark.parametrize(
    "arg, message",
    [
        ("steps=2.5", "'steps' = 2.5 has the wrong type; expected int"),
        ("steps=true", "'steps' = True has the wrong type"),
        ("steps=0", "'steps' = 0 is out of range; allowed: [1, inf]"),
        ("inner.lr=2", "'inner.lr' = 2.0 is out of range; allowed: [0, 1]"),
        ("inner.mode=c", "'inner.mode' = 'c' is not allowed; expected one of 'a', 'b'"),
        ("flag=yes please", "'flag' = 'yes please' has the wrong type; expected bool"),
        ("inner=3", "'inner' = 3 has the wrong type"),
        ("weights.x=abc", "'weights.x' = 'abc' has the wrong type; expected float"),
        ("steps", "argument 'steps' is not understood"),
    ],
)
def test_bad_values_give_one_clear_message(arg, message):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, [arg])
    assert message in str(err.value)


def test_yaml_file_then_overrides_and_saved_config_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 5, "inner": {"lr": 0.5}}))
    cfg = load_config(Outer, ["--config", str(path), "steps=7"])
    assert cfg.steps == 7 and cfg.inner.lr == 0.5 and cfg.inner.mode == "a"
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Outer, ["--config", str(tmp_path / "saved.yaml")]) == cfg
    assert to_dict(cfg)["inner"] == {"lr": 0.5, "mode": "a"}


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, ["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, ["--config", str(tmp_path / "list.yaml")])
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not valid UTF-8 YAML"):
        load_config(Outer, ["--config", str(tmp_path / "bin.yaml")])


def _job_configs():
    """Every config dataclass of every job script and of the package."""
    from stitchvm_rl.draft import DraftRolloutConfig
    from stitchvm_rl.draft_learner import DraftTrainConfig
    from stitchvm_rl.faults import DraftFaults, NFTFaults, StitchFaults
    from stitchvm_rl.learner import NFTTrainConfig
    from stitchvm_rl.rollout import RolloutConfig
    from stitchvm_rl.toyworld import ToyWorldConfig
    from stitchvm_rl.tracking import WandbConfig
    from stitchvm_rl.value.build import StitchConfig
    from stitchvm_rl.value.evaluate import ValueEvalConfig
    from stitchvm_rl.value.train import StitchDataConfig, StitchTrainConfig

    found = [ToyWorldConfig, ValueEvalConfig, StitchDataConfig, StitchTrainConfig, StitchConfig, RolloutConfig, NFTTrainConfig, WandbConfig, NFTFaults, StitchFaults]
    found += [DraftRolloutConfig, DraftTrainConfig, DraftFaults]
    for script in sorted((ROOT / "jobs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"job_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # inspect.getsource finds classes through sys.modules
        spec.loader.exec_module(module)
        found += [v for k, v in vars(module).items() if k.endswith("Config") and dataclasses.is_dataclass(v) and v.__module__ == module.__name__]
    return found


def test_every_config_field_has_a_one_line_docstring():
    configs = _job_configs()
    assert len(configs) >= 3
    for cls in configs:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert "\n" not in docs[f.name], f"{cls.__name__}.{f.name}: docstring must be one line"


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_into_their_job(path):
    """jobs/configs/<job>_*.yaml is read by jobs/<job>.py: every key and type must be valid there."""
    job = path.stem.split("_")[0]
    spec = importlib.util.spec_from_file_location(f"job_{job}", ROOT / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    (cls,) = [v for k, v in vars(module).items() if k.lower() == f"{job}config" and dataclasses.is_dataclass(v)]  # the job's own config, wherever defined
    if "_layout_" in path.stem:  # a layout laid over a run's config (load_config's later --config)
        run = sorted(path.parent.glob(f"{job}_sd35m_*.yaml"))[0]
        cfg = load_config(cls, ["--config", str(run), "--config", str(path)])
        assert cfg.run_name == run.stem
        return
    cfg = load_config(cls, ["--config", str(path)])
    assert cfg.run_name == path.stem


def test_the_shipped_nft_comparison_scores_both_estimators_on_the_same_reward():
    """nft_sd35m_terminal.yaml and nft_sd35m_stitchvm.yaml train on the same rewards from the same
    weights, and the stitchvm run's value models are the shipped stitch configs' outputs, one per
    reward, each stitched from that reward's own CLIP (like for like: the paper's Table 3)."""
    from stitchvm_rl import rewards
    from stitchvm_rl.value.build import StitchConfig

    nft = _load_script("nft")
    configs = ROOT / "jobs" / "configs"
    terminal, stitchvm = (load_config(nft.NFTConfig, ["--config", str(configs / f"nft_sd35m_{name}.yaml")]) for name in ("terminal", "stitchvm"))
    assert terminal.rollout.estimator == "terminal" and stitchvm.rollout.estimator == "stitchvm"
    assert terminal.rewards == stitchvm.rewards and terminal.reward_sources == stitchvm.reward_sources
    stitched = {}
    for path in sorted(configs.glob("stitch_*.yaml")):
        stitch = load_config(StitchConfig, ["--config", str(path)])
        stitched[f"{stitch.storage_path}/{stitch.run_name}/files/value_model"] = stitch
    by_reward = {}
    for source in stitchvm.value_models:
        assert source in stitched, f"value model {source} is built by no shipped stitch config"
        (name,) = [n for n in stitchvm.rewards if rewards.reward_source(n, stitchvm.reward_sources) == stitched[source].reward_model]
        by_reward[name] = stitched[source]
        assert stitched[source].backbone == stitchvm.backbone
    assert sorted(by_reward) == sorted(stitchvm.rewards) and len(set(stitchvm.rewards.values())) == 1  # summed value models = equally weighted rewards


def test_configuration_page_is_generated_from_the_configs_and_current():
    """docs/configuration.md is `python jobs/config_reference.py`'s output for today's configs, and
    every job that takes key=value arguments has its section."""
    import re

    reference = _load_script("config_reference")
    takes_config = {p.stem for p in (ROOT / "jobs").glob("*.py") if re.search(r"\bload_config\(", p.read_text())}
    assert takes_config - {"plan", "device_check"} == set(reference.JOB_CONFIGS)  # they take the planned jobs' own keys
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference.render(), "docs/configuration.md is stale: run `python jobs/config_reference.py`"
    assert "| `rollout.async` | `false` | bool |" in page  # a keyword key is written as users type it


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
