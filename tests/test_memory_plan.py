"""The GPU memory plan (stitchvm_rl/memory_plan.py, memory_roles.py, jobs/plan.py): weights counted
at the published sizes, activations that match what autograd really keeps, every shipped config
planned, refusals that name the role."""

import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_job
from stitchvm_rl import memory_plan, memory_roles, zoo
from stitchvm_rl.config import load_config
from stitchvm_rl.costs import count_flops_and_saved_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
# SD3.5-Medium's published parameter counts (model cards / safetensors headers) and buffer elements
SD35M_PARAMS = {"transformer": 2_243_171_520, "vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656}
SD35M_BUFFERS = {"transformer": 226_492_416}  # the 384^2 x 1536 position table (the CLIPs' int64 position ids aside)


def test_the_plan_counts_sd35m_weights_as_published_parameters_times_the_dtype_size():
    parts = memory_roles.sd3_parts(zoo.SD35_MEDIUM, "bfloat16")
    items = {i.what: i.bytes for i in memory_roles.parts_items(parts, "bfloat16")}
    for part, params in SD35M_PARAMS.items():
        ids = 77 * 8 if part in ("text_encoder", "text_encoder_2") else 0
        assert items[f"{part} weights (bfloat16)"] == 2 * (params + SD35M_BUFFERS.get(part, 0)) + ids, part


def _saved_on_cpu(transformer, batch: int, side: int, tokens: int) -> int:
    """What autograd keeps for one real CPU forward (each storage once; the CPU's own SDPA kernel)."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    embeds = torch.randn(batch, tokens, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    t = torch.full((batch,), 500.0)
    return count_flops_and_saved_bytes(lambda: transformer(hidden_states=z, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample, unique=True)[1]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_planned_activations_match_the_saved_tensor_bytes_of_a_real_forward(checkpointing):
    planned = memory_roles.sd3_parts("tiny-sd3", "float32")["transformer"]
    real = zoo.load_sd3_transformer("tiny-sd3")
    for model in (planned, real):
        memory_roles.add_lora(model, 4, 8, torch.float32)
        if checkpointing:
            model.enable_gradient_checkpointing()
    batch, side, tokens = 4, 8, 120
    plan = memory_plan.saved_bytes(memory_roles.velocity_call(planned, batch, side, tokens))
    measured = _saved_on_cpu(real, batch, side, tokens)
    assert abs(plan - measured) <= 0.15 * measured, (plan, measured)
    assert plan > 0


def _nft(argv: list[str]):
    nft = load_job("nft")
    return nft, load_config(nft.NFTConfig, argv)


def test_the_toy_run_on_gpus_is_planned_and_refused_when_a_role_exceeds_its_gpu():
    nft, cfg = _nft(["rollout_gpus=1", "train.use_gpu=true", "memory.gpu_gib=40"])
    plans = {p.role: p for p in nft.plan_memory(cfg)}
    assert set(plans) == {"rollout actor", "learner rank", "learner rank 0"}
    assert all(p.fits and p.budget_gib == 40 for p in plans.values())
    # rank 0 holds what every rank holds and the reward models too
    assert plans["learner rank 0"].total_gib > plans["learner rank"].total_gib
    nft, cfg = _nft(["rollout_gpus=1", "train.use_gpu=true", "memory.gpu_gib=1"])  # the CUDA context alone is 1 GiB
    with pytest.raises(memory_plan.MemoryPlanError, match="^the rollout actor needs .* but has 1.0 GiB .*; the learner rank needs"):
        memory_plan.check(nft.plan_memory(cfg))
    with pytest.warns(UserWarning, match="memory plan: the rollout actor needs"):
        memory_plan.check(nft.plan_memory(cfg), enforce=False)


def test_gradient_checkpointing_shrinks_the_planned_learner_step():
    nft, plain = _nft(["train.use_gpu=true", "memory.gpu_gib=40"])
    _, checkpointed = _nft(["train.use_gpu=true", "memory.gpu_gib=40", "train.gradient_checkpointing=true"])
    step = [{p.role: p for p in nft.plan_memory(cfg)}["learner rank"].phases[0].bytes for cfg in (plain, checkpointed)]
    assert step[1] < step[0] / 2


def test_the_draft_learner_plans_its_k_steps_and_its_objective():
    """A DRaFT-3 micro-step keeps one step's activations with draft.checkpoint_steps and three
    without; the terminal objective adds the VAE decode and the reward under the graph, StitchVM the
    value model instead (and every rank but rank 0 then holds no reward)."""
    draft = load_job("draft")

    def plans(*argv):
        cfg = load_config(draft.DraftConfig, ["train.use_gpu=true", "memory.gpu_gib=40", "draft.backprop_steps=3", *argv])
        return {p.role: p for p in draft.plan_memory(cfg)}

    terminal, stitchvm, uncheckpointed = plans(), plans("draft.estimator=stitchvm"), plans("draft.checkpoint_steps=false")
    step = {name: p["learner rank"].phases[0] for name, p in (("terminal", terminal), ("stitchvm", stitchvm), ("uncheckpointed", uncheckpointed))}
    assert [c.key[0] for c in step["terminal"].calls] == ["velocity", "decode", "clip image"]
    assert [c.key[0] for c in step["stitchvm"].calls] == ["velocity", "value"]
    one_step = memory_plan.saved_bytes(step["terminal"].calls[0])
    assert step["uncheckpointed"].bytes - step["terminal"].bytes == 2 * one_step
    assert not any("reward" in i.what for i in stitchvm["learner rank"].resident) and any("reward" in i.what for i in stitchvm["learner rank 0"].resident)
    assert all(p.fits for p in (*terminal.values(), *stitchvm.values()))


def _shipped_plans():
    plan = load_job("plan")
    shipped = sorted(p for p in CONFIGS.glob("*.yaml") if "_layout_" not in p.name)
    runs = {p.name: ["--config", str(p)] for p in shipped}
    layout = CONFIGS / "nft_layout_one_node_8x80gb.yaml"
    runs |= {f"{p.name} + {layout.name}": ["--config", str(p), "--config", str(layout)] for p in shipped if p.name.startswith("nft_")}
    # each stitch layout over one stitch config (the ViT-H ones are the largest); docs/memory.md has every combination
    for files in (["stitch_sd35m_hpsv2.yaml", "stitch_layout_1024.yaml"], ["stitch_sd35m_clip.yaml", "stitch_layout_one_node_8x80gb.yaml"],
                  ["stitch_sd35m_dfn_clip.yaml", "stitch_layout_1024.yaml", "stitch_layout_one_node_8x80gb.yaml"]):
        runs[" + ".join(files)] = [arg for f in files for arg in ("--config", str(CONFIGS / f))]
    return plan, runs


def test_every_shipped_config_passes_its_plan_and_the_learner_ranks_hold_no_text_encoder(capsys):
    plan, runs = _shipped_plans()
    assert len(runs) == 16  # 2 NFT configs + their one-node layout, 2 DRaFT configs, 4 stitch configs + 3 with the stitch layouts, 1 sample config, 2 evaluate configs
    for name, argv in runs.items():
        result = plan.main(argv)
        assert all(role["fits"] and role["budget_gib"] for role in result.values()), (name, result)
    printed = capsys.readouterr().out
    nft_plan = printed[printed.index("nft: "):]
    learner = nft_plan[nft_plan.index("\nlearner rank x8"):nft_plan.index("\nlearner rank 0")]
    assert "text_encoder" not in learner and "transformer weights (bfloat16)" in learner
    # the layout: each role's GPU and how many of it a node of its type holds
    assert "rollout actor x8: 45.0 GiB of GPU (1 GPU each); node type 'rollout_gpu' of cluster/aws.yaml: g6e.2xlarge, 1 GPU(s) of 45.0 GiB, 1 per node" in nft_plan
    assert "learner rank x8: 40.0 GiB of GPU (1 GPU each); node type 'learner_gpu' of cluster/aws.yaml: p4d.24xlarge, 8 GPU(s) of 40.0 GiB, 8 per node" in nft_plan


def test_the_24gb_rollout_layout_is_refused_naming_the_rollout_actor(tmp_path, capsys):
    cluster = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    cluster["available_node_types"]["rollout_gpu"]["node_config"]["InstanceType"] = "g5.2xlarge"  # one A10G, 24 GB: the layout before this plan
    (tmp_path / "aws_a10g.yaml").write_text(yaml.safe_dump(cluster))
    with pytest.raises(memory_plan.MemoryPlanError) as err:
        load_job("plan").main(["--config", str(CONFIGS / "nft_sd35m_stitchvm.yaml"), f"memory.cluster_yaml={tmp_path / 'aws_a10g.yaml'}"])
    message = str(err.value)
    assert message.startswith("the rollout actor needs") and "but has 22.5 GiB of GPU" in message and "learner" not in message
    assert "jobs/plan.py --config" in message
    printed = capsys.readouterr().out
    assert "text_encoder_3 weights (bfloat16)" in printed and "DOES NOT FIT" in printed


def test_a_later_config_file_is_laid_over_the_earlier_section_by_section():
    nft = load_job("nft")
    cfg = load_config(nft.NFTConfig, ["--config", str(CONFIGS / "nft_sd35m_stitchvm.yaml"), "--config", str(CONFIGS / "nft_layout_one_node_8x80gb.yaml"), "train.lr=1e-4"])
    assert (cfg.rollout_workers, cfg.rollout_resources, cfg.train.num_workers, cfg.train.resources_per_worker) == (4, {}, 4, {})
    assert cfg.train.gradient_checkpointing and cfg.train.dtype == "bfloat16" and cfg.train.lr == 1e-4  # the run config's other train keys stay
    assert cfg.rollout.estimator == "stitchvm" and cfg.memory.gpu_gib == 79.6


@pytest.mark.parametrize("dtype, lora_dtype", [("bfloat16", None), ("bfloat16", torch.float32)], ids=["actor", "learner"])
def test_planned_lora_bytes_are_the_three_adapters_the_policy_really_adds(dtype, lora_dtype):
    from stitchvm_rl.policy import SD3Policy

    policy = SD3Policy.from_pretrained("tiny-sd3", dtype=dtype)
    policy.add_lora(4, 8, float32=lora_dtype is not None)
    real = sum(p.numel() * p.element_size() for n, p in policy.transformer.named_parameters() if ".lora_" in n)
    planned = memory_roles.sd3_parts("tiny-sd3", dtype)["transformer"]
    memory_roles.add_lora(planned, 4, 8, lora_dtype)
    assert memory_roles.lora_bytes(planned) == real


def test_without_a_cluster_config_each_role_gets_this_machines_smallest_gpu(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"  # two GPUs, as `nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits` prints them (MiB)
    fake.write_text("#!/bin/sh\necho 81559\necho 40960\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    nft, cfg = _nft(["rollout_gpus=0.5", "train.use_gpu=true", "train.num_workers=1", "train.gpus_per_worker=0.5"])
    plans = {p.role: p for p in nft.plan_memory(cfg)}
    assert plans["rollout actor"].budget_gib == 20.0 and plans["learner rank"].budget_gib == 20.0  # half of the smaller GPU
    assert "this machine's 2 GPU(s), the smallest 40.0 GiB (nvidia-smi)" in memory_plan.describe(list(plans.values()))
