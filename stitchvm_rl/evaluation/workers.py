"""The evaluation's two Ray Data stages.

    driver: rows (policy, prompt index, prompt, noise seed), the ones scores.jsonl lacks
      --map_batches(SampleImages, one actor per GPU)-->  N images per row (ODE, or a guidance method
                                                         of jobs/dps.py): PNGs written under the
                                                         run's files, uint8 arrays passed on
      --map_batches(ScoreImages, scorer actors)-->       N scores per scorer and row (images dropped)
    driver: each row appended to scores.jsonl as it arrives

Every image's initial noise comes from its row's seed alone (N draws from one generator per prompt),
never from the batch it lands in or the actor that samples it: a re-run, a resumed run and another
policy see the same noise for the same image. And every model call has one fixed batch size (a short
batch is padded with copies of its last row, then cut): a float32 matmul's rows depend on the shape
it is computed at, not on the other rows, so an image and its scores do not depend on which prompts
shared its batch -- a resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass

import numpy as np
import torch

from stitchvm_rl import storage
from stitchvm_rl.evaluation import scorers
from stitchvm_rl.guidance import GuidanceConfig, build_value, guided_sample
from stitchvm_rl.policy import SD3Policy

# The evaluation's noise lives far above every rollout seed and apart from the training-time
# evaluation's stream (`evaluator.EVAL_NOISE_SEED`), so a policy is never scored on training noise.
NOISE_SEED_BASE = 2**41
PROMPTS_PER_SEED = 2**20  # a suite has fewer prompts than this


def noise_seed(seed: int, index: int) -> int:
    """The generator seed of prompt `index`'s images."""
    return NOISE_SEED_BASE + seed * PROMPTS_PER_SEED + index


def image_name(policy: str, index: int, k: int) -> str:
    """Where image k of a prompt lives under the run's files."""
    return f"images/{policy}/{index:04d}_{k}.png"


@dataclass(frozen=True)
class Guidance:
    """What the guided policies (`dps:<method>`) of an evaluation share: jobs/dps.py's sampler on the
    protocol's steps and CFG, a DPS scale per value, the value model and the rewards it needs."""

    config: GuidanceConfig
    scales: dict[str, float]
    value_model: str
    rewards: dict[str, float]
    reward_sources: dict[str, str]


def guided_method(source: str) -> str:
    """'stitchvm' of a policy source 'dps:stitchvm'; '' for any other policy."""
    return source.removeprefix("dps:") if source.startswith("dps:") else ""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings every policy of one evaluation shares."""

    num_steps: int
    cfg_scale: float
    resolution: int
    sampler: str
    images_per_prompt: int


class SampleImages:
    """Ray Data actor: the backbone loaded once, with each policy's LoRA as a named adapter and each
    guided policy's value; a batch of rows becomes N images per row, saved as PNG to the run's files
    and passed on as uint8. A guided policy samples one prompt's N images at a time, its SDE noise
    seeded by the prompt's seed, so its images too do not depend on the batch."""

    def __init__(self, backbone: str, policies: dict[str, str], loras: dict[str, str], sampling: Sampling, guidance: Guidance, files_root: tuple[str, str], device: str, dtype: str, prompts_per_batch: int):
        self.policy = SD3Policy.from_pretrained(backbone, dtype=dtype, device=device)
        self.loras = loras
        for name, lora in loras.items():
            if lora:
                self.policy.pipe.load_lora_weights(storage.local_copy(lora), adapter_name=name)
        self.sampling, self.prompts_per_batch = sampling, prompts_per_batch
        self.files = storage.RunFiles(*files_root)
        self.guided = {name: guided_method(source) for name, source in policies.items() if guided_method(source)}
        self.values = self._values(guidance) if self.guided else {}
        self.guidance = guidance

    def _values(self, guidance: Guidance) -> dict:
        """{policy: its value object} (`guidance.build_value`), the models each needs loaded once."""
        from stitchvm_rl import rewards
        from stitchvm_rl.value.model import StitchedValueModel

        kinds = {m.removeprefix("fk_") for m in self.guided.values()}
        self.policy.transformer.requires_grad_(False)
        self.policy.vae.requires_grad_(False)
        reward = rewards.build_rewards(guidance.rewards, guidance.reward_sources, device=str(self.policy.device)) if kinds & {"tweedie", "best_of_n"} else None
        model = StitchedValueModel.from_pretrained(guidance.value_model, device=str(self.policy.device), dtype=str(self.policy.dtype).removeprefix("torch.")) if "stitchvm" in kinds else None
        return {name: build_value(method, self.policy, reward, model, self.sampling.cfg_scale) for name, method in self.guided.items()}

    def _use(self, policy: str) -> None:
        """Switch the transformer to `policy`'s adapter (none: the base)."""
        transformer = self.policy.transformer
        if not any(self.loras.values()):
            return
        if self.loras.get(policy):
            transformer.enable_adapters()
            transformer.set_adapter(policy)
        else:
            transformer.disable_adapters()

    def noise(self, seeds: list[int]) -> torch.Tensor:
        n, res = self.sampling.images_per_prompt, self.sampling.resolution or None
        return torch.cat([self.policy.initial_noise(n, torch.Generator().manual_seed(int(s)), resolution=res) for s in seeds])

    def _guided(self, policy: str, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """A guided policy's final latents, one prompt's N images at a time (SDE noise from its seed)."""
        g = self.guidance
        method = self.guided[policy]
        cfg = dataclasses.replace(g.config, num_steps=self.sampling.num_steps, cfg_scale=self.sampling.cfg_scale, scale=g.scales.get(method.removeprefix("fk_"), 0.0),
                                  bon_samples=g.config.bon_samples or g.config.particles)  # Best-of-N alone: FK's particle count
        n, out = self.sampling.images_per_prompt, []
        for k, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(int(seed) + 1)
            out.append(guided_sample(method, self.policy, self.values[policy], cfg, prompts[k * n : (k + 1) * n], self.noise([seed]), generator, self.sampling.resolution or None))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s, n = self.sampling, self.sampling.images_per_prompt
        images = np.zeros((len(batch["index"]), n, 0, 0, 3), np.uint8)
        for prompt in dict.fromkeys(batch["prompt"].tolist()):  # each encoded alone: a fixed batch here too
            self.policy.encode_prompts([prompt])
        for policy in dict.fromkeys(batch["policy"].tolist()):
            rows = np.flatnonzero(batch["policy"] == policy)
            self._use(policy)
            if policy in self.guided:  # one prompt's N images at a time: a fixed batch already
                prompts = [batch["prompt"][r] for r in rows for _ in range(n)]
                z = self._guided(policy, prompts, batch["noise_seed"][rows].tolist())
                z = z[torch.as_tensor(padded(np.arange(len(z)), self.prompts_per_batch * n))]  # the decode's fixed batch
            else:
                full = padded(rows, self.prompts_per_batch)
                prompts = [batch["prompt"][r] for r in full for _ in range(n)]
                z = self.policy.sample(prompts, s.num_steps, s.cfg_scale, s.sampler, noise=self.noise(batch["noise_seed"][full].tolist())).final
            x = (self.policy.decode(z).float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            x = x[: len(rows) * n].reshape(len(rows), n, *x.shape[1:])
            if images.shape[2] == 0:
                images = np.zeros((len(batch["index"]), *x.shape[1:]), np.uint8)
            images[rows] = x
            for r, row_images in zip(rows, x):
                for k, image in enumerate(row_images):
                    self.files.write_bytes(image_name(policy, int(batch["index"][r]), k), png_bytes(image))
        return {**batch, "images": images}


class ScoreImages:
    """Ray Data actor: every scorer loaded once; a batch's images become N scores per scorer and row."""

    def __init__(self, names: list[str], sources: dict[str, str], device: str, dtype: str, batch_size: int):
        self.scorers = {name: scorers.load_scorer(name, sources, device=device, dtype=dtype) for name in names}
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("images")
        rows, n = images.shape[:2]
        flat = images.reshape(rows * n, *images.shape[2:])
        prompts = np.array([p for p in batch["prompt"].tolist() for _ in range(n)], dtype=object)
        metadata = np.array([m for m in batch["metadata"].tolist() for _ in range(n)], dtype=object)
        for name, scorer in self.scorers.items():
            scores, notes = [], []
            for i in range(0, len(flat), self.batch_size):
                chunk, real = padded(np.arange(i, min(i + self.batch_size, len(flat))), self.batch_size), min(self.batch_size, len(flat) - i)
                chunk_scores, chunk_notes = scorers.score(scorer, flat[chunk], prompts[chunk].tolist(), metadata[chunk].tolist())
                scores.append(chunk_scores[:real])
                notes += (chunk_notes or [])[:real]
            batch[f"score:{name}"] = np.concatenate(scores).reshape(rows, n)
            if notes:  # GenEval: why each image failed ('' when it passed), a JSON list per row
                batch[f"notes:{name}"] = np.array([json.dumps(notes[r * n : (r + 1) * n]) for r in range(rows)], dtype=object)
        return batch


def padded(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` made `size` long with copies of its last (a model call of a fixed batch size)."""
    return np.concatenate([rows, np.repeat(rows[-1:], max(0, size - len(rows)))])


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()
