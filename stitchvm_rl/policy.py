"""`SD3Policy`: an SD3 / SD3.5 pipeline seen as a velocity field, with LoRA adapters for RL.

Adapters (peft, on the transformer's attention projections):
    "default"   the policy being trained (theta)
    "old"       the data-collection policy (theta_old), moved by `soft_update("old", eta)`
    "ema"       the evaluation copy (an EMA of theta), moved by `soft_update("ema", decay)`
    None        adapters disabled = the frozen reference (base) model
Adapters travel between processes as `AdapterState` (a flat tensor dict + version + checksum).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass

import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from stitchvm_rl import flow, zoo

LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
ADAPTERS = ("default", "old", "ema")


@dataclass
class PromptEmbeds:
    """SD3 text conditioning for a batch: joint-attention tokens and the pooled vector."""

    embeds: torch.Tensor  # (B, T, joint_attention_dim)
    pooled: torch.Tensor  # (B, pooled_projection_dim)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([i.embeds for i in items]), torch.cat([i.pooled for i in items]))


@dataclass
class AdapterState:
    """A LoRA adapter as plain CPU tensors, with the version that produced it and a checksum."""

    tensors: dict[str, torch.Tensor]
    version: int
    checksum: str

    def checksum_as(self, dtype: str) -> str:
        """The checksum of these tensors cast to `dtype` (the canonical form a receiver holding its
        model in that dtype answers with: an fp32 learner's adapter in a bf16 actor)."""
        return tensor_checksum({k: v.to(zoo.DTYPES[dtype]) for k, v in self.tensors.items()})


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vae_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """SD3-normalised latents -> images in [0, 1]."""
    x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> SD3-normalised latents `(E(x).mean - shift) * scale`."""
    mean = vae.encode(images.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
    return (mean - vae.config.shift_factor) * vae.config.scaling_factor


class SD3Policy:
    """Velocity `v(z_t, t, prompt)` of an SD3 transformer, prompt-embedding cache, VAE, LoRA."""

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        # SD3 pipelines use 256 T5 tokens; tiny tokenizers declare a shorter maximum
        self.max_sequence_length = max_sequence_length or min(pipe.tokenizer_3.model_max_length, 256)
        self._prompt_cache: dict[str, PromptEmbeds] = {}

    @classmethod
    def from_pretrained(cls, source: str, dtype: str = "float32", device: str = "cpu") -> SD3Policy:
        return cls(zoo.load_sd3_pipeline(source, dtype=dtype, device=device))

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents at the model's native sample size."""
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)

    # ------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Embeddings of `prompts`, each prompt encoded once per process and cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                missing,
                None,
                None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            for n, prompt in enumerate(missing):
                self._prompt_cache[prompt] = PromptEmbeds(embeds[n : n + 1].to(self.dtype), pooled[n : n + 1].to(self.dtype))
        return PromptEmbeds.cat([self._prompt_cache[p] for p in prompts])

    # ------------------------------------------------------------ velocity
    def velocity(self, z: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds, cfg_scale: float = 1.0) -> torch.Tensor:
        """v(z_t, t | prompt) with the currently active adapter; CFG against the empty prompt if cfg_scale != 1."""
        t = t.to(z.device, torch.float32).expand(z.shape[0])  # float32 into the time embedder: bf16 rounds t to steps of 1/256 above 0.5
        if cfg_scale == 1.0:
            return self.transformer(
                hidden_states=z, timestep=1000 * t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled
            ).sample
        uncond = self.encode_prompts([""] * len(cond))
        both = PromptEmbeds.cat([uncond, cond])
        v = self.transformer(
            hidden_states=torch.cat([z, z]),
            timestep=1000 * torch.cat([t, t]),
            encoder_hidden_states=both.embeds,
            pooled_projections=both.pooled,
        ).sample
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    def velocity_fn(self, cond: PromptEmbeds, cfg_scale: float = 1.0) -> flow.VelocityFn:
        return lambda z, t: self.velocity(z, t, cond, cfg_scale)

    def latent_shape_at(self, resolution: int | None) -> tuple[int, int, int]:
        """(C, H, W) of the latents for square images of `resolution` pixels (None: native size)."""
        if resolution is None:
            return self.latent_shape
        factor = self.pipe.vae_scale_factor * self.transformer.config.patch_size
        if resolution % factor:
            raise ValueError(f"resolution {resolution} must be a multiple of {factor} (VAE factor x patch size)")
        side = resolution // self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    def initial_noise(self, n: int, generator: torch.Generator | None = None, resolution: int | None = None) -> torch.Tensor:
        shape = self.latent_shape_at(resolution)
        return torch.randn((n, *shape), generator=generator).to(self.device, self.dtype)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        num_steps: int = 20,
        cfg_scale: float = 1.0,
        sampler: str = "dpm2",
        stop_after: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        resolution: int | None = None,
    ) -> flow.Trajectory:
        """Sample latents for `prompts` on the model's own schedule; see `flow` for the samplers."""
        sigmas = flow.sd3_sigmas(num_steps, scheduler_config=self.pipe.scheduler.config)
        z = self.initial_noise(len(prompts), generator, resolution) if noise is None else noise.to(self.device, self.dtype)
        fn = self.velocity_fn(self.encode_prompts(prompts), cfg_scale)
        if sampler == "dpm2":
            return flow.dpm2(fn, z, sigmas, stop_after)
        if sampler == "euler":
            return flow.euler_ode(fn, z, sigmas, stop_after)
        if sampler == "sde":
            return flow.flow_sde(fn, z, sigmas, stop_after, generator=generator)
        raise ValueError(f"unknown sampler '{sampler}'; choose dpm2, euler or sde")

    # ------------------------------------------------------------ VAE (SD3's normalised latent space)
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable; wrap in no_grad when not needed)."""
        return vae_decode(self.vae, z)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> normalised latents `(E(x).mean - shift) * scale`."""
        return vae_encode(self.vae, images)

    # ------------------------------------------------------------ LoRA
    def add_lora(self, rank: int = 32, alpha: float = 64, targets: list[str] = LORA_TARGETS, float32: bool = False) -> None:
        """Add the trained adapter "default" and its copies "old" (data collection) and "ema" (evaluation).
        `float32`: LoRA weights in float32 whatever the base weights' dtype (a learner: a soft update of
        weight 0.1 is below one bf16 ulp, and gradients and optimizer state follow the weights' dtype)."""
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
        with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in ADAPTERS:
                self.transformer.add_adapter(config, adapter_name=name)
        if float32:  # peft casts its input to the LoRA weights' dtype and its output back to the base layer's
            for name in ADAPTERS:
                for p in self._lora_params(name).values():
                    p.data = p.data.float()
        for name in ADAPTERS[1:]:
            self.soft_update(name, eta=0.0)
        self.transformer.set_adapter("default")

    @contextlib.contextmanager
    def adapter(self, name: str | None):
        """Run the transformer with adapter `name` ("default", "old") or with none (reference model)."""
        if name is None:
            self.transformer.disable_adapters()
        else:
            self.transformer.set_adapter(name)
        try:
            yield
        finally:
            # peft's set_adapter makes only the active adapter trainable; "default" is the trained one
            if name is None:
                self.transformer.enable_adapters()
            self.transformer.set_adapter("default")

    def _lora_params(self, name: str) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.transformer.named_parameters() if f".lora_A.{name}." in k or f".lora_B.{name}." in k}

    @torch.no_grad()
    def soft_update(self, name: str, eta: float) -> None:
        """theta_name <- eta * theta_name + (1 - eta) * theta   (eta = 0: a copy of "default")."""
        new = self._lora_params("default")
        for key, p in self._lora_params(name).items():
            p.lerp_(new[key.replace(f".{name}.", ".default.")], 1.0 - eta)

    @torch.no_grad()
    def adapter_distance(self, name: str, other: str = "default") -> float:
        """||theta_name - theta_other|| over all LoRA weights (e.g. how far "old" trails "default")."""
        b = self._lora_params(other)
        return sum(((p - b[k.replace(f".{name}.", f".{other}.")]) ** 2).sum() for k, p in self._lora_params(name).items()).sqrt().item()

    def save_lora(self, directory: str, name: str = "default") -> None:
        """Write adapter `name` as a diffusers LoRA (pytorch_lora_weights.safetensors with its LoraConfig
        as metadata): `StableDiffusion3Pipeline.load_lora_weights(directory)` reads it back."""
        state = get_peft_model_state_dict(self.transformer, adapter_name=name)
        config = self.transformer.peft_config[name]
        metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
        StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata)

    def export_adapter(self, name: str = "default", version: int = 0) -> AdapterState:
        """The adapter as a flat dict of CPU tensors (keys without the adapter name), versioned, checksummed."""
        if name not in getattr(self.transformer, "peft_config", {}):
            raise ValueError(f"the transformer has no LoRA adapter '{name}'; call add_lora() first")
        tensors = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.transformer, adapter_name=name).items()}
        return AdapterState(tensors, version, tensor_checksum(tensors))

    def load_adapter(self, state: AdapterState, name: str = "old") -> None:
        """Load an exported adapter into adapter `name`; refuse a corrupted or mismatched one."""
        if tensor_checksum(state.tensors) != state.checksum:
            raise ValueError(f"adapter version {state.version} failed its checksum: it was changed or corrupted in transit")
        expected = self._lora_params(name)
        if len(state.tensors) != len(expected):
            raise ValueError(
                f"adapter version {state.version} has {len(state.tensors)} tensors but adapter '{name}' has "
                f"{len(expected)}: it was made for another model or LoRA config"
            )
        result = set_peft_model_state_dict(self.transformer, state.tensors, adapter_name=name)
        if result.unexpected_keys:
            raise ValueError(
                f"adapter version {state.version} did not fit adapter '{name}': unexpected keys "
                f"{result.unexpected_keys[:3]}...; it was made for another model or LoRA config"
            )
