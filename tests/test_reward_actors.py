"""Rewards on their own Ray actors (GenEval's detector, ImageReward): the rollout actors and learner
rank 0 get the actors' scores in place of the model, identical to the in-process reward."""

import json

import pytest
import torch

from stitchvm_rl import reward_actors, rewards, runtime
from stitchvm_rl.config import ConfigError
from stitchvm_rl.evaluation import geneval

METADATA = {
    "a photo of a dog": {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
    "a photo of two cats": {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
    "a photo of a red car": {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
}


SOURCES = {"image_reward": "tiny-image-reward", "geneval": "tiny-mask2former", "geneval_clip": "toyworld-clip"}
IMAGES = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_a_served_reward_answers_as_the_in_process_one():
    """ImageReward on a reward actor (found by name, through the object store) scores exactly as in
    this process; a weighted sum mixes it with in-process rewards; no gradient crosses the actor."""
    import ray

    runtime.init_ray(4)
    served = reward_actors.actor_names("served-test", {"image_reward": 1.0, "toy_clip": 1.0}, count=1)
    assert served == {"image_reward": ["served-test-reward-image_reward-0"]}
    actors = reward_actors.start_reward_actors(served, SOURCES, {}, gpus=0)
    try:
        prompts = ["a red square on the left", "a blue circle on the right", "a photo of a dog"]
        weighted = rewards.build_rewards({"image_reward": 1.0, "redness": 2.0}, SOURCES, served=served)
        parts = weighted.components(IMAGES, prompts)
        assert torch.equal(parts["image_reward"], rewards.build_reward("image_reward", SOURCES)(IMAGES, prompts).float())
        assert torch.equal(weighted(IMAGES, prompts), parts["image_reward"] + 2 * parts["redness"])
        with pytest.raises(ValueError, match="cannot be differentiated"):
            weighted(IMAGES, prompts, grad=True)
    finally:
        for actor in actors:
            ray.kill(actor)


def test_the_geneval_reward_actor_scores_each_prompt_by_its_metadata_in_chunks():
    """The actor's own code (run in this process): uint8 images, each prompt's metadata, the partial score."""
    actor = reward_actors.RewardActor("geneval", SOURCES, METADATA, batch_size=2)
    actor.scorer.detector.model.class_predictor.bias.data[geneval.CLASSNAMES.index("dog")] += 30.0  # every query a dog
    uint8 = (IMAGES * 255).round().to(torch.uint8)
    # "a dog": 20 dogs kept (at most 16) -> 1 - |1 - 16| / 1 = -14; "two cats": 0 of 2 -> 0; "a red car": 0 of 1, then no colour -> 0
    assert actor.score(uint8, list(METADATA)).tolist() == [-14.0, 0.0, 0.0]


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
