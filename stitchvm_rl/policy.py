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
from collections import OrderedDict
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
    """Velocity `v(z_t, t, prompt)` of an SD3 transformer, prompt-embedding cache, VAE, LoRA.

    Prompt embeddings (2.6 MiB a prompt at SD3.5-M with 256 T5 tokens) are cached on the CPU, the
    `prompt_cache` most recently used ones (None: all), and moved to the model's device per batch."""

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int = 256, prompt_cache: int | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        # SD3 pipelines use 256 T5 tokens (DiffusionNFT's runs 128); tiny tokenizers declare a shorter maximum
        self.max_sequence_length = min(pipe.tokenizer_3.model_max_length, max_sequence_length)
        self.prompt_cache = prompt_cache
        self._prompt_cache: OrderedDict[str, PromptEmbeds] = OrderedDict()

    @classmethod
    def from_pretrained(cls, source: str, dtype: str = "float32", device: str = "cpu", text_encoders: bool = True, max_sequence_length: int = 256, prompt_cache: int | None = None) -> SD3Policy:
        """`text_encoders=False` for a process handed its prompt embeddings (`zoo.load_sd3_pipeline`)."""
        return cls(zoo.load_sd3_pipeline(source, dtype=dtype, device=device, text_encoders=text_encoders), max_sequence_length, prompt_cache)

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
    @property
    def has_text_encoders(self) -> bool:
        return self.pipe.text_encoder is not None

    def drop_text_encoders(self) -> None:
        """Free the text encoders once every prompt this process needs is cached (learner rank 0 after
        encoding its evaluation prompts): T5-XXL alone is 8.9 GiB of GPU at SD3.5-M in bf16."""
        self.pipe.text_encoder = self.pipe.text_encoder_2 = self.pipe.text_encoder_3 = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Embeddings of `prompts` on the model's device, each prompt encoded once and kept in the CPU cache."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing and not self.has_text_encoders:
            raise ValueError(f"{len(missing)} prompts are not cached (e.g. {missing[0]!r}) and this policy has no text encoders; load it with text_encoders=True or encode them before drop_text_encoders()")
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
                self._prompt_cache[prompt] = PromptEmbeds(embeds[n : n + 1].to("cpu", self.dtype), pooled[n : n + 1].to("cpu", self.dtype))
        for p in prompts:
            self._prompt_cache.move_to_end(p)
        out = PromptEmbeds.cat([self._prompt_cache[p] for p in prompts])
        while self.prompt_cache is not None and len(self._prompt_cache) > max(self.prompt_cache, len(set(prompts))):
            self._prompt_cache.popitem(last=False)  # least recently used first
        return PromptEmbeds(out.embeds.to(self.device), out.pooled.to(self.device))

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
