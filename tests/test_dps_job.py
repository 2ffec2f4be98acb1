"""jobs/dps.py end to end on the toy world with tiny sizes: every method in its own process."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from stitchvm_rl.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def load_job():
    spec = importlib.util.spec_from_file_location("job_dps", ROOT / "jobs" / "dps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dps_job_runs_every_method_in_its_own_process(tmp_path, toy_value_dir):
    methods = ["none", "tweedie", "stitchvm", "fk_stitchvm", "best_of_n"]
    args = [f"output_dir={tmp_path}", f"value_model={toy_value_dir}", f"methods=[{','.join(methods)}]", "prompts=[a red circle on the left, a green triangle on the right]",
            "images_per_prompt=2", "guidance.num_steps=6", "guidance.particles=2", "guidance.resample_every=2"]
    summary = load_job().main(args)
    rows = summary["methods"]
    assert list(rows) == methods and len({r["process"] for r in rows.values()}) == len(methods)
    assert all(r["seconds_per_sample"] > 0 and r["peak_memory_mib"] > 0 and 0 <= r["caption_accuracy"] <= 1 for r in rows.values())
    assert summary["speedup_stitchvm_over_tweedie"] == pytest.approx(rows["tweedie"]["seconds_per_sample"] / rows["stitchvm"]["seconds_per_sample"])
    assert set(summary["reward_gain_over_none"]) == set(methods[1:])
    # the same initial noise, so the unguided images differ from the guided ones only through guidance
    assert rows["tweedie"]["reward_total"] != rows["none"]["reward_total"]
    # evaluations per image, counted: FK's 2 particles x 6 steps through the transformer, and 2 values at
    # the start, 2 at each of the 2 resamplings (steps 2 and 4 of 6), 2 at the end; Best-of-N at that
    # budget: floor(20 / (6 + 1)) = 2 samples, each 6 transformer rows and 1 reward
    fk, bon = rows["fk_stitchvm"], rows["best_of_n"]
    assert (fk["transformer_rows_per_image"], fk["value_rows_per_image"]) == (12, 8)
    assert (bon["samples_per_prompt"], bon["transformer_rows_per_image"], bon["value_rows_per_image"]) == (2, 12, 2)
    assert (rows["none"]["transformer_rows_per_image"], rows["none"]["value_rows_per_image"]) == (6, 0)
    assert (tmp_path / "dps" / "grid.png").is_file() and json.loads((tmp_path / "dps" / "summary.json").read_text())["methods"].keys() == rows.keys()


@pytest.mark.parametrize(
    "args, message",
    [
        (["methods=[none,dsp]"], "unknown or empty"),
        (["methods=[stitchvm]", "scales={tweedie: 0.1}"], "scales.stitchvm"),
        (["value_model=/no/such/model"], "does not exist"),
    ],
)
def test_bad_settings_stop_before_any_work(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        load_job().main([f"output_dir={tmp_path}", *args])


def test_compile_without_a_cpp_compiler_stops_before_any_work(tmp_path, monkeypatch):
    from torch._inductor import exc

    def no_compiler():
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        load_job().main([f"output_dir={tmp_path}", "compile=true"])
    assert not (tmp_path / "dps").exists()
