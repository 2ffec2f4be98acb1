"""Rewards on their own Ray actors (GenEval's detector, ImageReward): the rollout actors and learner
rank 0 get the actors' scores in place of the model, identical to the in-process reward."""

import json

import pytest
import torch

from stitchvm_rl import reward_actors, rewards, runtime
from stitchvm_rl.config import ConfigError

GENEVAL_PROMPT = "a photo of a dog"
METADATA = {GENEVAL_PROMPT: {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}}


@pytest.mark.slow
def test_served_rewards_answer_as_the_in_process_ones():
    runtime.init_ray(4)
    served = reward_actors.actor_names("served-test", {"image_reward": 1.0, "geneval": 1.0, "toy_clip": 1.0}, count=1)
    assert served == {"image_reward": ["served-test-reward-image_reward-0"], "geneval": ["served-test-reward-geneval-0"]}
    sources = {"image_reward": "tiny-image-reward", "geneval": "tiny-mask2former", "geneval_clip": "toyworld-clip"}
    actors = reward_actors.start_reward_actors(served, sources, METADATA, gpus=0)
    try:
        images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        prompts = [GENEVAL_PROMPT, "a red square on the left", "a blue circle"]
        weighted = rewards.build_rewards({"image_reward": 1.0, "geneval": 2.0}, sources, served=served)
        parts = weighted.components(images, prompts)
        assert torch.equal(parts["image_reward"], rewards.build_reward("image_reward", sources)(images, prompts).float())
        # the tiny random detector finds no dog: GenEval's partial score of one unmet clause is 0
        assert parts["geneval"].tolist() == [0.0, 0.0, 0.0]
        assert torch.equal(weighted(images, prompts), parts["image_reward"] + 2 * parts["geneval"])
        with pytest.raises(ValueError, match="cannot be differentiated"):
            weighted(images, prompts, grad=True)
    finally:
        import ray

        for actor in actors:
            ray.kill(actor)


def test_geneval_is_refused_where_it_cannot_be_served(tmp_path):
    with pytest.raises(ConfigError, match="non-differentiable reward served by reward actors"):
        rewards.check_reward_weights({"geneval": 1.0}, "guidance_rewards")
    with pytest.raises(ValueError, match="served by reward actors only"):
        rewards.build_reward("geneval")
    from conftest import load_job

    nft = load_job("nft")
    with pytest.raises(ConfigError, match="prompt_file=<a .jsonl"):
        nft.check(nft.load_config(nft.NFTConfig, [f"output_dir={tmp_path}", "rewards={geneval: 1.0}"]))
    lacking = tmp_path / "prompts.jsonl"
    lacking.write_text(json.dumps({"prompt": "a dog", "tag": "single_object"}) + "\n")
    with pytest.raises(ConfigError, match="1 prompts lack GenEval metadata"):
        nft.check(nft.load_config(nft.NFTConfig, [f"output_dir={tmp_path}", "rewards={geneval: 1.0}", f"prompt_file={lacking}"]))
