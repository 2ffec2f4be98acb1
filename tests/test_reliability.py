"""Bad input is refused early with one clear message; secrets never reach logs; no user file is
unpickled; the config parser and the prompt-file reader survive fuzzing (hypothesis)."""

import ast
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import load_job
from stitchvm_rl import nft, prompts, toyworld
from stitchvm_rl.config import ConfigError, load_config
from stitchvm_rl.policy import SD3Policy
from stitchvm_rl.value.data import scan_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad files of every kind, made once."""
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "blank.txt").write_text("\n   \n\t\n")
    (d / "file.bin").write_bytes(b"not a model")
    (d / "empty_model").mkdir()
    other = d / "vm_other" / "value_model"
    other.mkdir(parents=True)
    (other / "value_model.json").write_text(json.dumps({"backbone": "tiny-sd3", "dit_block": 2}))
    broken_json = d / "vm_broken" / "value_model"
    broken_json.mkdir(parents=True)
    (broken_json / "value_model.json").write_text("{not json")
    images = d / "images"
    images.mkdir()
    toyworld.save_grid(toyworld.render(["a red circle on the left"], torch.Generator().manual_seed(0)), images / "good.png", nrow=1)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return d


# (job, arguments, the message it must give); {d} is the folder of bad files above
BAD_JOB_INPUTS = [
    ("nft", ["epochz=3"], "unknown config key 'epochz'; did you mean 'epochs'?"),
    ("nft", ["epochs=two"], "'epochs' = 'two' has the wrong type"),
    ("nft", ["groups_per_epoch=-8"], "'groups_per_epoch' = -8 is out of range"),
    ("nft", ["rollout.group_size=1"], "'rollout.group_size' = 1 is out of range"),
    ("nft", ["train.lr=-0.1"], "'train.lr' = -0.1 is out of range"),
    ("nft", ["rollout.stop_max=10"], "stop_min <= stop_max < num_steps"),
    ("nft", ["rollout.estimator=oracle"], "'rollout.estimator' = 'oracle' is not allowed"),
    ("nft", ["groups_per_epoch=3"], "multiple of train.num_workers"),
    ("nft", ["compare=[terminal,stichvm]"], "unknown estimator"),
    ("nft", ["backbone={d}/no_such_model"], "is neither an existing directory nor a hub id"),
    ("nft", ["backbone={d}/file.bin"], "is a file; pass the directory"),
    ("nft", ["prompt_file={d}/latin1.txt"], "is not UTF-8 text"),
    ("nft", ["prompt_file={d}/blank.txt"], "holds no prompts"),
    ("nft", ["prompt_file={d}/missing.txt"], "does not exist"),
    ("nft", ["prompt_file={d}/blank.txt", "prompts=[a red square on the left]"], "not both"),
    ("nft", ["value_models=[{d}/no_such_vm]"], "does not exist; build one with `python jobs/stitch.py`"),
    ("nft", ["value_models=[{d}/vm_other/value_model]"], "was stitched from backbone 'tiny-sd3' but the policy is 'toyworld'"),
    ("nft", ["value_models=[{d}/vm_broken/value_model]"], "malformed value_model.json"),
    ("nft", ["train.zero_stage=3"], "train.zero_stage=3: ZeRO-3 partitions every weight across the learner ranks"),
    ("nft", ["backbone=tiny-sd3", "rollout.estimator=stitchvm"], "backbone 'tiny-sd3' has no default value model"),
    ("nft", ["rollout_gpus=1", "memory.gpu_gib=1"], "the rollout actor needs"),
    ("nft", ["rollout_gpus=1", "rollout_resources={{gpu_node: 1}}"], "their memory is not known"),
    ("nft", ["rollout_gpus=1", "rollout_resources={{rollout_node: 1}}", "memory.cluster_yaml={d}/nowhere.yaml"], "nowhere.yaml does not exist"),
    ("nft", ["train.use_gpu=true", "train.gpus_per_worker=0.5", "memory.gpu_gib=80"], "NCCL refuses two ranks on one GPU"),
    ("stitch", ["train.use_gpu=true", "memory.gpu_gib=1"], "the stitch learner rank needs"),
    ("dps", ["device=cuda", "memory.gpu_gib=1"], "the DPS worker (none) needs"),
    ("sample", ["device=cuda", "memory.gpu_gib=1"], "the sampler (jobs/sample.py) needs"),
    ("dps", ["methods=[none,magic]"], "unknown or empty"),
    ("dps", ["methods=[stitchvm]", "scales={{tweedie: 0.01}}"], "has no DPS scale; set scales.stitchvm"),
    ("dps", ["value_model={d}/vm_other/value_model"], "was stitched from backbone 'tiny-sd3'"),
    ("stitch", ["data.source=folder", "data.folder={d}/images"], "broken.png' cannot be read"),
    ("stitch", ["data.source=folder", "data.folder={d}/nowhere"], "does not exist"),
    ("stitch", ["data.source=folder", "data.folder={d}/images", "data.skip_broken_images=true"], "folder images have no captions"),
    ("stitch", ["train.zero_stage=3"], "use train.zero_stage=2"),
    ("stitch", ["data.num_images=40"], "less than one batch of 32, so stage 2 would train nothing"),
    ("stitch", ["data.source=folder", "data.folder={d}/images", "data.skip_broken_images=true", "head_conditioning=empty"], "1 training images give"),
    ("cost", ["resolution=100"], "must be a multiple of 16"),
    ("bench", ["sections=[warp]"], "unknown or empty"),
]


@pytest.mark.parametrize("job, args, message", BAD_JOB_INPUTS, ids=[f"{j}:{' '.join(a)}" for j, a, _ in BAD_JOB_INPUTS])
def test_bad_input_stops_with_one_clear_message_before_any_work(inputs, tmp_path, job, args, message):
    out = tmp_path / "outputs"
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_job(job).main([f"output_dir={out}", *(a.format(d=inputs) for a in args)])
    assert message in str(err.value)
    assert not out.exists()  # refused before the run directory (or anything else) was made


def test_a_prompt_file_with_a_byte_order_mark_and_crlf_reads_as_plain_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red circle on the left\r\n\r\na blue square on the right\r\n".encode())
    assert prompts.read_prompt_file(path) == ["a red circle on the left", "a blue square on the right"]


def test_broken_images_are_skipped_and_counted_when_allowed(inputs):
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 2"):
        good = scan_image_folder(str(inputs / "images"), skip_broken=True)
    assert [p.name for p in good] == ["good.png"]


def test_bad_model_directory_names_the_fix(inputs):
    with pytest.raises(ValueError, match="model_index.json|not an SD3 pipeline|pipeline"):
        SD3Policy.from_pretrained(str(inputs / "empty_model"))


def test_non_finite_rewards_are_refused():
    scores = torch.tensor([0.1, float("nan"), 0.3, 0.4])
    with pytest.raises(ValueError, match="NaN|finite"):
        nft.optimality_probability(scores, torch.tensor([0, 0, 1, 1]), 5.0)
    with pytest.raises(ValueError, match="NaN|finite"):
        nft.optimality_probability(torch.tensor([0.1, float("inf"), 0.3, 0.4]), torch.tensor([0, 0, 1, 1]), 5.0)


def test_latents_of_the_wrong_shape_are_refused_by_the_value_model():
    from stitchvm_rl.value.search import build_value_model

    gen = torch.Generator().manual_seed(0)
    model, _ = build_value_model("toyworld", "toyworld-clip", toyworld.render(toyworld.random_captions(16, gen), gen))
    prompts_ = ["a red circle on the left"] * 2
    assert model(torch.randn(2, 16, 8, 8), torch.full((2,), 0.5), prompts_).shape == (2,)
    with pytest.raises(ValueError, match=r"latents of shape \(2, 4, 8, 8\) do not fit this value model: its backbone takes \(B, 16, H, W\)"):
        model(torch.randn(2, 4, 8, 8), torch.full((2,), 0.5), prompts_)
    with pytest.raises(ValueError, match="do not fit this value model"):
        model(torch.randn(16, 8, 8), torch.full((1,), 0.5), prompts_[:1])
    with pytest.raises(ValueError, match="noise levels of shape \\(3,\\) do not fit 2 latents"):
        model(torch.randn(2, 16, 8, 8), torch.full((3,), 0.5), prompts_)


# ---------------------------------------------------------------- security
def test_no_user_file_is_ever_unpickled():
    """AST scan of the package and the jobs: no pickle/marshal loads, torch.load only with
    weights_only=True, yaml only through safe_load, no eval/exec."""
    offences = []
    for path in [*(ROOT / "stitchvm_rl").rglob("*.py"), *(ROOT / "jobs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner in ("pickle", "cPickle", "marshal", "dill") and name in ("load", "loads"):
                offences.append(f"{where} {owner}.{name}")
            if owner == "torch" and name == "load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
                if not safe:
                    offences.append(f"{where} torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                offences.append(f"{where} yaml.{name}")
            if isinstance(fn, ast.Name) and fn.id in ("eval", "exec"):
                offences.append(f"{where} {fn.id}")
    assert not offences, offences


@pytest.mark.slow
def test_api_keys_never_reach_ray_logs_or_the_run_directory(tmp_path):
    """A job's Ray workers get WANDB_API_KEY from the environment, but Ray's logs (which record runtime
    envs in clear) and the run directory never hold it."""
    secret = "test-secret-4f9c2a7e"
    script = (
        "import os, ray\n"
        "from stitchvm_rl import runtime\n"
        "runtime.init_ray(2)\n"
        "print('worker sees key:', ray.get(ray.remote(lambda: os.environ.get('WANDB_API_KEY')).remote()) == os.environ['WANDB_API_KEY'])\n"
        "ray.shutdown()\n"
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "WANDB_API_KEY": secret, "HF_TOKEN": secret, "STITCHVM_RAY_TMP": str(ray_tmp)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "worker sees key: True" in result.stdout
    sample = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), f"output_dir={tmp_path / 'out'}", "prompts=[a red circle on the left]", "images_per_prompt=1"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-2000:]
    files = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_socket()]
    assert any(p.name == "runtime_env_agent.log" for p in files)  # the log that would show a runtime env's secrets
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leaks, leaks
    assert secret not in result.stdout + result.stderr + sample.stdout + sample.stderr


def test_local_cluster_mutes_the_placement_group_cleaners_warning_every_second():
    """The local cluster runs without the dashboard, so Ray Train's placement-group cleaner cannot
    reach the State API and would warn once a second through every stitch and NFT job; the workers'
    setup hook mutes that one logger (and the name it mutes is the cleaner's own)."""
    import importlib
    import logging

    import ray

    from stitchvm_rl import runtime

    name = runtime.PLACEMENT_GROUP_CLEANER_LOGGER
    assert importlib.import_module(name).logger.name == name
    runtime.init_ray(4)
    level = ray.get(ray.remote(lambda: logging.getLogger(name).getEffectiveLevel()).options(num_cpus=0).remote())
    assert level == logging.ERROR


def test_cluster_dashboards_listen_on_loopback_only():
    import yaml

    for name in ("aws", "gcp", "local"):
        cluster = yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())
        head = " ".join(cluster["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head, name
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    secrets = {k: v for k, v in env["env_vars"].items() if k.endswith(("_KEY", "_TOKEN", "SECRET", "PASSWORD"))}
    assert secrets and all(v == f"${{{k}}}" for k, v in secrets.items())  # templates expanded on each node, never values


# ---------------------------------------------------------------- fuzzing
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


# Example counts: what still finds a bug in seconds (the inputs below are the hard cases, kept explicit).
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(key="epochs", value="1e3")  # YAML reads a float: an int field refuses it
@example(key="train.lr", value="1e-4")  # YAML 1.1 reads a string: a float field converts it
@example(key="train.lr", value=".nan")
@example(key="epochs", value="yes")  # YAML 1.1 reads a bool: never an int
@example(key="rewards", value="{a: [1, 2]}")
@example(key="train", value="{lr: x}")
@example(key="prompts", value="")
@example(key="rollout.async", value="null")
@given(key=st.sampled_from(["epochs", "train.lr", "rollout.group_size", "rollout.estimator", "rewards", "prompts", "rollout.async", "wandb.mode", "seeds", "nosuch", "train", ""]), value=_text)
def test_fuzz_config_overrides_parse_or_refuse_clearly(key, value):
    """Any `key=value` either loads into a valid config or raises ConfigError -- nothing else."""
    job = _nft_job()
    try:
        cfg = load_config(job.NFTConfig, [f"{key}={value}"])
    except ConfigError as err:
        assert str(err) and "\n" not in str(err).strip()
    else:
        assert isinstance(cfg.epochs, int) and cfg.epochs >= 1 and isinstance(cfg.train.lr, float)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@example(body="- a\n- b")  # a list, not a mapping
@example(body="epochs: [")  # broken YAML
@example(body="!!python/object/apply:os.system ['true']")  # safe_load refuses code
@example(body="train: 3")  # a value where a section belongs
@given(body=st.text(max_size=200))
def test_fuzz_yaml_config_files_load_or_refuse_clearly(tmp_path, body):
    path = tmp_path / "c.yaml"
    path.write_text(body)
    try:
        load_config(_nft_job().NFTConfig, ["--config", str(path)])
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@example(data=b"\xef\xbb\xbfa prompt\r\n")  # a BOM and CRLF
@example(data="a\u2028b\x85c\x1cd".encode())  # line breaks splitlines knows and "\n" does not
@example(data=b"\xff\xfe")  # not UTF-8
@example(data=b" \t\n\x0b\x0c")  # only white space
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_fuzz_prompt_file_reader(tmp_path, data):
    """Any bytes: a list of non-blank, stripped prompts -- or a ValueError naming the file."""
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    try:
        got = prompts.read_prompt_file(path)
    except ValueError as err:
        assert str(path) in str(err)
    else:
        assert got and all(p and p == p.strip() and "\n" not in p for p in got)


_nft_job = functools.cache(lambda: load_job("nft"))



# ---------------------------------------------------------------- silent weight-sync failures
def test_an_adapter_that_fits_no_module_is_refused(tiny_policy):
    """Keys of another model (here: renamed) would load into zero LoRA modules; that is an error."""
    policy = SD3Policy.from_pretrained("tiny-sd3")
    policy.add_lora(4, 8)
    state = policy.export_adapter("default", version=1)
    renamed = {k.replace("transformer_blocks", "blocks"): v for k, v in state.tensors.items()}
    from stitchvm_rl.policy import AdapterState, tensor_checksum

    with pytest.raises(ValueError, match="did not fit adapter 'old'.*another model or LoRA config"):
        policy.load_adapter(AdapterState(renamed, 1, tensor_checksum(renamed)), "old")


@pytest.mark.slow
def test_a_sync_whose_answer_differs_from_what_was_sent_stops_the_run():
    """The learner compares each actor's checksum of what it now holds with what it sent cast to the
    actor's dtype: an actor holding it in bf16 is in sync; one whose copy went through fp16 on the way
    (stored differently from what was sent) stops the run with a clear error."""
    import ray

    from stitchvm_rl import benchmark, runtime
    from stitchvm_rl.weight_sync import push_adapter

    runtime.init_ray(4)
    shapes = {"a.lora_A.weight": (4, 8), "a.lora_B.weight": (8, 4)}
    state = benchmark.random_adapter(shapes, "float32", version=7)
    sink = ray.remote(benchmark.AdapterSink).options(num_cpus=0)
    good, bf16, lossy = sink.remote(shapes, "float32"), sink.remote(shapes, "bfloat16"), sink.remote(shapes, "float32", via="float16")
    try:
        push_adapter(state, [good, bf16])  # the same tensors, in each actor's dtype: no error
        with pytest.raises(RuntimeError, match=r"adapter sync failed: sent version 7 .* actors answered"):
            push_adapter(state, [good, lossy])
        # an actor that has used up its restarts is named, not waited for
        ray.kill(lossy, no_restart=True)
        with pytest.raises(RuntimeError, match=r"rollout actor \S+ is dead and will not be restarted again .*rollout_max_restarts"):
            push_adapter(state, [good, lossy])
    finally:
        ray.kill(good), ray.kill(bf16), ray.kill(lossy)


@pytest.mark.slow
def test_a_failing_learner_stops_the_job_with_its_own_error_in_one_line(tmp_path):
    """Ray Train wraps a rank's exception in a TrainingFailedError carrying the remote traceback;
    the jobs raise the rank's own error instead, in one line that names the stage."""
    from stitchvm_rl import runtime

    def train_loop(config):
        raise ValueError("rank-side failure")

    runtime.init_ray(4)
    trainer = runtime.torch_trainer(train_loop, {}, 1, False, 0, str(tmp_path), "fails")
    with pytest.raises(RuntimeError) as err:
        runtime.fit(trainer, "stage 2 (stitch finetuning)")
    assert str(err.value).startswith("stage 2 (stitch finetuning) failed: ")
    assert "ValueError: rank-side failure" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_learner_processes_unpickle_checkpoints_tensors_only(tmp_path):
    """DeepSpeed calls torch.load(weights_only=False); in a learner process (after setup_deepspeed)
    a checkpoint file that carries code is refused instead of run."""
    script = (
        "import os, pickle, sys, torch\n"
        "from stitchvm_rl.runtime import setup_deepspeed\n"
        "class Payload:\n"
        "    def __reduce__(self):\n"
        "        return (os.system, ('echo pwned > ' + sys.argv[1],))\n"
        "path = sys.argv[1] + '.pt'\n"
        "torch.save({'w': torch.zeros(2), 'x': Payload()}, path)\n"
        "setup_deepspeed()\n"
        "try:\n"
        "    torch.load(path, weights_only=False)\n"
        "except pickle.UnpicklingError as err:\n"
        "    print('refused:', 'weights_only' in str(err) or 'Weights only' in str(err))\n"
    )
    marker = tmp_path / "pwned"
    result = subprocess.run([sys.executable, "-c", script, str(marker)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: True" in result.stdout and not marker.exists()
