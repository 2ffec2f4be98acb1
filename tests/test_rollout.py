"""RolloutWorker as a Ray actor on the toy world: what each estimator returns, reproducibility from
(prompts, seed, adapter version), and adapter sync."""

import pytest
import torch

from stitchvm_rl import flow, nft, rewards, runtime, toyworld
from stitchvm_rl.policy import SD3Policy
from stitchvm_rl.rollout import RolloutConfig, RolloutWorker, check_rollout_config
from stitchvm_rl.value.model import StitchedValueModel
from stitchvm_rl.value.search import build_value_model

PROMPTS = ["a red circle on the left", "a blue square on the right"]
CFG = dict(group_size=3, num_steps=6, stop_min=2, stop_max=4, lora_rank=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def value_dir(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    captions = toyworld.random_captions(16, gen)
    model, _ = build_value_model("toyworld", "toyworld-clip", toyworld.render(captions, gen), max_dit_block=2, rm_blocks=(1,))
    return str(model.save(tmp_path_factory.mktemp("vm") / "value_model"))


def _prompts(batch):
    """The prompt of every sample of a batch."""
    return [batch.group_prompts[g] for g in batch.groups.tolist()]


def _actor(estimator, value_models=(), reward_weights=None):
    import ray

    runtime.init_ray()
    return ray.remote(RolloutWorker).remote("toyworld", RolloutConfig(estimator=estimator, **CFG), {"toy_clip": 1.0} if reward_weights is None else reward_weights, list(value_models))


@pytest.fixture(scope="module")
def terminal_actors():
    """Two terminal actors, shared: the rollout test reads them at version 0, then the sync test loads an adapter."""
    return _actor("terminal"), _actor("terminal")


@pytest.mark.slow
def test_terminal_rollouts_are_clean_samples_scored_by_the_pixel_reward(terminal_actors):
    import ray

    a, b = terminal_actors
    batch, again = ray.get([a.rollout.remote(PROMPTS, 11), b.rollout.remote(PROMPTS, 11)])
    assert batch.anchors.shape == (6, 16, 8, 8) and bool((batch.tau == 0).all()) and batch.version == 0
    assert _prompts(batch) == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert torch.equal(batch.anchors, again.anchors) and torch.equal(batch.scores, again.scores)  # any actor can redo it
    policy = SD3Policy.from_pretrained("toyworld")
    with torch.no_grad():
        expected = rewards.build_reward("toy_clip")(policy.decode(batch.anchors), _prompts(batch))
    assert torch.allclose(batch.scores, expected, atol=1e-5)
    assert not torch.equal(batch.anchors, ray.get(a.rollout.remote(PROMPTS, 12)).anchors)
    r = nft.optimality_probability(batch.scores, batch.groups)
    assert torch.allclose(r.view(2, 3).mean(1), torch.full((2,), 0.5), atol=1e-6)


@pytest.mark.slow
def test_stitchvm_rollouts_stop_early_per_group_and_carry_the_value(value_dir):
    import ray

    actor = _actor("stitchvm", [value_dir], reward_weights={})  # no drift watch: the actor loads no reward
    batch = ray.get(actor.rollout.remote(PROMPTS, 5))
    with pytest.raises(ray.exceptions.RayTaskError, match="started without rewards"):
        ray.get(actor.value_drift.remote(PROMPTS[:1], 0))
    sigmas = flow.sd3_sigmas(6, scheduler_config=SD3Policy.from_pretrained("toyworld").pipe.scheduler.config)
    allowed = {round(float(sigmas[k]), 6) for k in range(2, 5)}
    for g in range(2):
        taus = batch.tau[batch.groups == g]
        assert len(set(taus.tolist())) == 1 and round(float(taus[0]), 6) in allowed  # one stop per group
    value = StitchedValueModel.from_pretrained(value_dir)
    with torch.no_grad():
        expected = value(batch.anchors, batch.tau, _prompts(batch))
    assert torch.allclose(batch.scores, expected, atol=1e-5)
    # the anchors are the sampler's own latents at step k, whose noise level is tau = sigma_k: the
    # first group redone from the request's seed (noise first, then k ~ U{stop_min..stop_max})
    policy = SD3Policy.from_pretrained("toyworld")
    gen = torch.Generator().manual_seed(5)
    noise = policy.initial_noise(3, gen)
    k = int(torch.randint(2, 5, (1,), generator=gen))
    with torch.no_grad():
        trajectory = policy.sample([PROMPTS[0]] * 3, 6, 1.0, "dpm2", noise=noise).latents
    assert torch.allclose(batch.anchors[:3], trajectory[k], atol=1e-5) and not torch.allclose(batch.anchors[:3], trajectory[k + 1], atol=1e-3)
    assert batch.tau[0] == pytest.approx(float(sigmas[k]))


@pytest.mark.slow
def test_an_actor_answers_with_the_checksum_of_the_adapter_it_holds_not_the_one_it_was_sent():
    """The answer is read back from the actor's model: one holding its weights in bfloat16 answers
    the checksum of the rounded adapter and its dtype, which the learner's check accepts as the fp32
    adapter it sent (the canonical form); the same bytes claimed as float32 are refused."""
    import ray

    from stitchvm_rl.policy import tensor_checksum
    from stitchvm_rl.weight_sync import check_answers

    runtime.init_ray()
    actor = ray.remote(RolloutWorker).remote("toyworld", RolloutConfig(estimator="terminal", dtype="bfloat16", **CFG), {"toy_clip": 1.0}, [])
    learner = SD3Policy.from_pretrained("toyworld")
    learner.add_lora(CFG["lora_rank"], CFG["lora_alpha"])
    state = learner.export_adapter("default", version=3)
    version, dtype, checksum = ray.get(actor.load_adapter.remote(state))
    assert (version, dtype) == (3, "bfloat16") and checksum == tensor_checksum({k: v.to(torch.bfloat16) for k, v in state.tensors.items()}) != state.checksum
    check_answers(state, [(version, dtype, checksum)])  # no error
    with pytest.raises(RuntimeError, match="adapter sync failed: sent version 3"):
        check_answers(state, [(version, "float32", checksum)])
    ray.kill(actor)


@pytest.mark.slow
def test_adapter_sync_answers_version_and_checksum_and_changes_the_samples(terminal_actors):
    import ray

    actor = terminal_actors[1]
    before = ray.get(actor.rollout.remote(PROMPTS[:1], 3))
    learner = SD3Policy.from_pretrained("toyworld")
    learner.add_lora(CFG["lora_rank"], CFG["lora_alpha"])
    with torch.no_grad():
        for name, p in learner.transformer.named_parameters():
            if ".lora_B.default." in name:
                p.add_(0.05)
    state = learner.export_adapter("default", version=3)
    assert ray.get(actor.load_adapter.remote(state)) == (3, "float32", state.checksum)
    after = ray.get(actor.rollout.remote(PROMPTS[:1], 3))
    assert after.version == 3 and not torch.allclose(after.anchors, before.anchors)
    state.tensors[next(iter(state.tensors))] += 1.0  # corrupted in transit
    with pytest.raises(ray.exceptions.RayTaskError, match="failed its checksum"):
        ray.get(actor.load_adapter.remote(state))


@pytest.mark.parametrize(
    "overrides, values, message",
    [
        (dict(stop_max=6), ["vm"], "stop_min <= stop_max < num_steps"),
        (dict(stop_min=5, stop_max=4), ["vm"], "stop_min <= stop_max < num_steps"),
        (dict(estimator="stitchvm"), [], "needs at least one value model"),
    ],
)
def test_bad_rollout_settings_stop_early(overrides, values, message):
    with pytest.raises(ValueError, match=message):
        check_rollout_config(RolloutConfig(**{**CFG, **overrides}), values)


@pytest.mark.slow
def test_a_compiled_rollout_worker_samples_scores_and_syncs_as_an_eager_one(value_dir, monkeypatch):
    import functools

    from stitchvm_rl import zoo

    # aot_eager: the same dynamo capture as inductor without C++ codegen (fast on CPU); GPUs use inductor
    monkeypatch.setattr(zoo, "compile_repeated_blocks", functools.partial(zoo.compile_repeated_blocks, backend="aot_eager"))
    eager, compiled = (RolloutWorker("toyworld", RolloutConfig(estimator="stitchvm", compile=c, **CFG), {"toy_clip": 1.0}, [value_dir]) for c in (False, True))
    assert all(b._compiled_call_impl is not None for b in compiled.policy.transformer.transformer_blocks)
    assert all(b._compiled_call_impl is not None for b in compiled.value_models[0].head.blocks)
    assert eager.policy.transformer.transformer_blocks[0]._compiled_call_impl is None
    before = compiled.rollout(PROMPTS, 5)
    with torch.no_grad():  # a trained-looking adapter, pushed to both: the compiled blocks must read the new weights
        for name, p in eager.policy.transformer.named_parameters():
            if ".lora_B.default." in name:
                p.add_(0.05)
    state = eager.policy.export_adapter("default", version=1)
    for worker in (eager, compiled):
        assert worker.load_adapter(state) == (1, "float32", state.checksum)
    a, b = eager.rollout(PROMPTS, 5), compiled.rollout(PROMPTS, 5)
    assert torch.allclose(a.anchors, b.anchors, atol=1e-4) and torch.allclose(a.scores, b.scores, atol=1e-4)
    assert torch.equal(a.tau, b.tau) and not torch.allclose(b.anchors, before.anchors, atol=1e-2)
