"""bf16 that trains: on a bf16 learner the LoRA weights, their gradients and optimizer state and the
`old` / EMA copies stay float32 (only the frozen base weights are bf16), and timesteps reach the
time embedder in float32. (An fp32 learner's adapter syncing with bf16 actors: test_rollout.py.)"""

import os
import socket

import pytest
import torch

from stitchvm_rl import nft
from stitchvm_rl.learner import NFTTrainConfig, build_learner
from stitchvm_rl.policy import SD3Policy
from stitchvm_rl.rollout import RolloutConfig

STEPS = 6


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group in this process, as a Ray Train rank has (DeepSpeed needs one)."""
    import torch.distributed as dist

    from stitchvm_rl.runtime import setup_deepspeed

    setup_deepspeed()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _train(dtype: str) -> tuple[list[dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]], list[float]]:
    """A tiny learner trained STEPS optimizer steps on a fixed regression, `old` and EMA following it
    as in train_loop; returns the trained adapter after every step (from the start on), the final
    `old` and EMA, and the losses."""
    rollout = RolloutConfig(lora_rank=4, lora_alpha=8, group_size=2)
    policy, engine = build_learner("tiny-sd3", 0, rollout, NFTTrainConfig(lr=1e-3, dtype=dtype, num_workers=1), rollout.group_size, grad_accum=1, device="cpu")
    gen = torch.Generator().manual_seed(0)
    z = torch.randn((2, *policy.latent_shape), generator=gen)
    target = torch.randn(z.shape, generator=gen)
    cond = policy.encode_prompts(["a red circle", "a blue square"])
    trained, losses = [policy.export_adapter("default").tensors], []
    for step in range(1, STEPS + 1):
        v = policy.velocity(z.to(policy.dtype), torch.tensor([0.7, 0.4]), cond)
        loss = ((v.float() - target) ** 2).mean()
        engine.backward(loss)
        engine.step()
        policy.soft_update("old", nft.old_policy_decay(step))
        policy.soft_update("ema", nft.ema_decay(step))
        trained.append(policy.export_adapter("default").tensors)
        losses.append(loss.item())
    return trained, {name: policy.export_adapter(name).tensors for name in ("old", "ema")}, losses


def _soft_updates_in_float64(trained: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """`old` and EMA as exact arithmetic makes them from the trained adapter's path."""
    old, ema = ({k: v.double() for k, v in trained[0].items()} for _ in range(2))
    for step, theta in enumerate(trained[1:], start=1):
        for copy, decay in ((old, nft.old_policy_decay(step)), (ema, nft.ema_decay(step))):
            for k in copy:
                copy[k] = decay * copy[k] + (1 - decay) * theta[k].double()
    return {"old": old, "ema": ema}


def test_a_bf16_learner_moves_old_and_ema_as_exact_arithmetic_does_and_trains_like_fp32(process_group):
    """An EMA step of weight 0.1 is below one bf16 ulp of a LoRA A weight: kept in bf16 (as DeepSpeed's
    bf16 mode casts the whole module) `old` and the EMA stall. Kept in float32 they follow the trained
    adapter's path as float64 soft updates of it do, and the regression's loss falls as in fp32."""
    trained, adapters, losses = _train("bfloat16")
    exact = _soft_updates_in_float64(trained)
    for name in ("old", "ema"):
        moved = torch.cat([(exact[name][k] - trained[0][k].double()).flatten() for k in sorted(exact[name])])
        error = torch.cat([(adapters[name][k].double() - exact[name][k]).flatten() for k in sorted(exact[name])])
        assert moved.norm() > 0 and error.norm() / moved.norm() < 1e-4, (name, (error.norm() / moved.norm()).item())
    _, _, fp32_losses = _train("float32")
    drop, fp32_drop = losses[0] - losses[-1], fp32_losses[0] - fp32_losses[-1]
    assert fp32_drop > 0 and abs(drop - fp32_drop) < 0.1 * fp32_drop, (losses, fp32_losses)


def test_a_bf16_learner_keeps_its_lora_weights_and_optimizer_in_float32(process_group):
    """Only the frozen base weights are bf16; the LoRA weights (so their gradients, accumulated over
    micro-steps) and the partitions DeepSpeed's optimizer steps are float32."""
    policy, engine = build_learner("tiny-sd3", 0, RolloutConfig(lora_rank=4, lora_alpha=8, group_size=2), NFTTrainConfig(dtype="bfloat16", num_workers=1), 2, 1, "cpu")
    lora = {k: p for k, p in policy.transformer.named_parameters() if ".lora_" in k}
    base = {k: p for k, p in policy.transformer.named_parameters() if ".lora_" not in k}
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for p in base.values()} == {torch.bfloat16} and policy.dtype == torch.bfloat16
    assert {p.dtype for group in engine.optimizer.param_groups for p in group["params"]} == {torch.float32}


def test_timesteps_reach_the_time_embedder_in_float32():
    """0.5 and 0.501 are one bf16 value; 1000 t is not: a bf16 model must still tell them apart."""
    assert torch.tensor(0.5, dtype=torch.bfloat16) == torch.tensor(0.501, dtype=torch.bfloat16)
    policy = SD3Policy.from_pretrained("tiny-sd3", dtype="bfloat16")
    z = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cond = policy.encode_prompts(["a red circle"])
    with torch.no_grad():
        a, b = (policy.velocity(z, torch.tensor([t]), cond) for t in (0.5, 0.501))
    assert not torch.equal(a, b)
