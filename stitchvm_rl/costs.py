"""Real-scale cost model without a GPU: published architectures on the `meta` device.

Shapes flow through the real module code, so parameter counts and FLOPs (torch's FlopCounterMode)
are those of SD3.5-Medium and CLIP ViT-L/14-336, though no weight exists and nothing is computed.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from stitchvm_rl import zoo


def count_flops(fn) -> int:
    """FLOPs of one call (forward only, or forward + backward if `fn` calls backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sd35m_value_model_costs(i: int = 4, j: int = 1, resolution: int = 1024, text_tokens: int = 333) -> dict:
    """Parameters and forward FLOPs of StitchVM(i, j) = SD3.5-M blocks 1..i + CLIP ViT-L/14-336
    tail, against what Tweedie scoring needs: a full SD3.5-M forward, a VAE decode, a CLIP forward."""
    from stitchvm_rl.value.model import DiTHead, StitchedValueModel, ValueModelConfig

    transformer = zoo.meta_model("sd35_medium_transformer")
    vae = zoo.meta_model("sd35_medium_vae")
    clip = zoo.meta_model("clip_vit_l14_336")
    side = resolution // 8
    with torch.device("meta"):
        null_embeds = torch.empty(1, text_tokens, transformer.config.joint_attention_dim)
        null_pooled = torch.empty(1, transformer.config.pooled_projection_dim)
        head = DiTHead(transformer, i, null_embeds, null_pooled)
        config = ValueModelConfig(i, j, "clip", zoo.SD35_MEDIUM, zoo.CLIP_VIT_L14_336, "meta")
        value_model = StitchedValueModel(config, head, clip)
        z = torch.empty(1, 16, side, side)
        t = torch.empty(1)
        pixels = torch.empty(1, 3, 336, 336)

    def full_dit():
        transformer(hidden_states=z, timestep=t, encoder_hidden_states=null_embeds, pooled_projections=null_pooled)

    costs = {
        "stitchvm": count_flops(lambda: value_model.embed(z, t)),
        "stitchvm_dit_head": count_flops(lambda: value_model.head(z, t)),
        "sd35m_transformer": count_flops(full_dit),
        "vae_decode": count_flops(lambda: vae.decode(z)),
        "clip_image": count_flops(lambda: clip.get_image_features(pixel_values=pixels)),
    }
    tweedie = costs["sd35m_transformer"] + costs["vae_decode"] + costs["clip_image"]
    return {
        "resolution": resolution,
        "stitch": {"dit_block": i, "rm_block": j},
        "params": {
            "stitchvm_total": zoo.count_params(value_model) - zoo.count_params(value_model.text_model) - zoo.count_params(value_model.text_projection),
            "stitchvm_dit_head": zoo.count_params(value_model.head),
            "stitchvm_stitch": zoo.count_params(value_model.stitch),
            "stitchvm_clip_tail": zoo.count_params(value_model.tail),
            "sd35m_transformer": zoo.count_params(transformer),
            "vae": zoo.count_params(vae),
            "clip_vision": zoo.count_params(clip.vision_model) + zoo.count_params(clip.visual_projection),
        },
        "forward_flops": costs | {"tweedie_total": tweedie},
        "flops_ratio_tweedie_over_stitchvm": tweedie / costs["stitchvm"],
    }


def count_flops_and_saved_bytes(fn, unique: bool = False) -> tuple[int, int]:
    """FLOPs of `fn` (forward + whatever backward it runs) and the bytes autograd saves for its
    backward -- tensors on the gradient path only, i.e. activations, not frozen weights -- at their
    dtype's size. An estimate of the backward's activation memory. `unique`: each storage once, at
    its full size (what the allocator holds: a tensor saved by two ops, or a view of a larger
    buffer, is one allocation)."""
    saved, seen = [0], set()

    def pack(t):
        if not t.requires_grad:
            return t
        if not unique:
            saved[0] += t.numel() * t.element_size()
            return t
        storage = t.untyped_storage()
        key = storage._cdata if t.is_meta else storage.data_ptr()  # meta storages have no address
        if key not in seen:
            seen.add(key)
            saved[0] += storage.nbytes()
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return counter.get_total_flops(), saved[0]


def sd35m_models(i: int, j: int, text_tokens: int, batch: int, device: str, dtype: str) -> tuple:
    """The SD3.5-M transformer and VAE, CLIP ViT-L/14-336 and StitchVM(i, j) over them, all frozen
    (random weights, or shapes only on `meta`), with `batch` random prompt embeddings; returns
    (transformer, vae, clip, value_model, embeds, pooled)."""
    from stitchvm_rl.value.model import DiTHead, StitchedValueModel, ValueModelConfig

    transformer = zoo.published_model("sd35_medium_transformer", device, dtype).requires_grad_(False)
    vae = zoo.published_model("sd35_medium_vae", device, dtype).requires_grad_(False)
    clip = zoo.published_model("clip_vit_l14_336", device, dtype).requires_grad_(False)
    dt = zoo.DTYPES[dtype]
    with torch.device(device):
        embeds = torch.randn(batch, text_tokens, transformer.config.joint_attention_dim, dtype=dt)
        pooled = torch.randn(batch, transformer.config.pooled_projection_dim, dtype=dt)
        head = DiTHead(transformer, i, embeds[:1], pooled[:1])
        value_model = StitchedValueModel(ValueModelConfig(i, j, "clip", zoo.SD35_MEDIUM, zoo.CLIP_VIT_L14_336, "meta"), head, clip).to(dt).requires_grad_(False)
    return transformer, vae, clip, value_model, embeds, pooled


def sd35m_guidance_steps(i: int = 4, j: int = 1, resolution: int = 1024, text_tokens: int = 333, cfg: bool = True, device: str = "meta", dtype: str = "bfloat16", compile: bool = False) -> tuple[dict, dict]:
    """One guided sampling step of SD3.5-M at real scale, as three callables over the same models:
        none      the transformer (x2 with CFG), no gradient
        tweedie   the same under autograd, + VAE decode + CLIP, then d r / d z_t through all of it
        stitchvm  the transformer without autograd + StitchVM(i, j) forward and backward
        stitchvm_shared (with CFG) the same value, its DiT head taken from CFG's unconditional pass
                  (the paper's section 5.2: `value.model.capture_head_features`): that pass's first i
                  blocks run under autograd and the head does not run again
    On `meta` they only propagate shapes (count FLOPs with them); on a GPU the weights are random
    (time them); `compile`: their SD3 and CLIP blocks run torch.compile'd (`zoo.compile_repeated_blocks`).
    Returns (steps, parameters each method keeps resident)."""
    from stitchvm_rl.value.model import capture_head_features

    side, batch, dt = resolution // 8, 2 if cfg else 1, zoo.DTYPES[dtype]
    transformer, vae, clip, value_model, embeds, pooled = sd35m_models(i, j, text_tokens, batch, device, dtype)
    t = torch.full((1,), 0.5, device=device)
    if compile:
        zoo.compile_repeated_blocks(transformer, clip, value_model)

    def velocity(z):
        v = transformer(hidden_states=z.expand(batch, -1, -1, -1), timestep=1000 * t.expand(batch), encoder_hidden_states=embeds, pooled_projections=pooled).sample
        return v.sum(0, keepdim=True)  # the CFG combination, as cheap as it is

    def latent(grad: bool):
        return torch.randn(1, 16, side, side, device=device, dtype=dt, requires_grad=grad)

    def none():
        with torch.no_grad():
            return velocity(latent(False))

    def tweedie():
        z = latent(True)
        x0 = z - velocity(z)
        image = vae.decode(x0).sample
        pixels = torch.nn.functional.interpolate(image, size=(336, 336), mode="bicubic")
        clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output).float().sum().backward()
        return z.grad

    def stitchvm():
        none()
        z = latent(True)
        value_model.embed(z, t)[0].sum().backward()
        return z.grad

    def stitchvm_shared():
        z = latent(True)

        def branch(zz, k):  # k = 0: the unconditional embedding (the head's), 1: the prompt's
            return transformer(hidden_states=zz, timestep=1000 * t, encoder_hidden_states=embeds[k : k + 1], pooled_projections=pooled[k : k + 1]).sample

        with capture_head_features(transformer, i) as tokens, torch.enable_grad():
            branch(z, 0)
        with torch.no_grad():
            branch(z.detach(), 1)
        value_model.embed_grid(value_model.head.grid(tokens[0], side, side))[0].sum().backward()
        return z.grad

    tail = zoo.count_params(value_model) - zoo.count_params(value_model.text_model) - zoo.count_params(value_model.text_projection)
    resident = {
        "none": zoo.count_params(transformer),
        "tweedie": zoo.count_params(transformer) + zoo.count_params(vae) + zoo.count_params(clip.vision_model) + zoo.count_params(clip.visual_projection),
        "stitchvm": zoo.count_params(transformer) + tail,
    }
    steps = {"none": none, "tweedie": tweedie, "stitchvm": stitchvm}
    if cfg:  # without CFG there is no unconditional pass for an empty-prompt head to share
        steps["stitchvm_shared"], resident["stitchvm_shared"] = stitchvm_shared, resident["stitchvm"]
    return steps, resident


def sd35m_guidance_step_costs(i: int = 4, j: int = 1, resolution: int = 1024, text_tokens: int = 333, cfg: bool = True) -> dict:
    """FLOPs (forward + backward) and the activations the backward keeps, of one guided step of
    SD3.5-M at real scale per method (`sd35m_guidance_steps` on `meta`)."""
    steps, _ = sd35m_guidance_steps(i, j, resolution, text_tokens, cfg)
    out = {}
    for name, fn in steps.items():
        flops, saved = count_flops_and_saved_bytes(fn)
        out[name] = {"flops": flops, "backward_activation_gib": saved / 2**30}
    return {
        "resolution": resolution,
        "cfg": cfg,
        "stitch": {"dit_block": i, "rm_block": j},
        "step": out,
        "flops_ratio_tweedie_over_stitchvm": out["tweedie"]["flops"] / out["stitchvm"]["flops"],
        "activation_ratio_tweedie_over_stitchvm": out["tweedie"]["backward_activation_gib"] / out["stitchvm"]["backward_activation_gib"],
        **({"flops_ratio_tweedie_over_stitchvm_shared": out["tweedie"]["flops"] / out["stitchvm_shared"]["flops"]} if "stitchvm_shared" in out else {}),
    }


def sd35m_nft_groups(group: int = 8, resolution: int = 512, num_steps: int = 25, stop: int = 14, train_timesteps: dict[str, int] | None = None, micro_batch: int = 4, lora_rank: int = 32, i: int = 4, j: int = 1, text_tokens: int = 333, device: str = "meta", dtype: str = "bfloat16", compile: bool = False) -> dict:
    """One prompt group's share of an NFT epoch at SD3.5-M scale, per estimator, as callables over the
    same models (the rollout actor's and the learner's work, in one process):
        terminal  `num_steps` sampling steps, VAE decode + CLIP ViT-L/14-336 (one reward model; the
                  SD3.5-M configs score with three), then training on `train_timesteps["terminal"]`
        stitchvm  `stop` steps (14: near the mean of U{12..17}), StitchVM(i, j) on z_tau (its head is
                  its own copy of the first i base blocks, as a loaded value model's), then training
                  on `train_timesteps["stitchvm"]` timesteps
    Training per timestep is `learner.nft_micro_step`'s work -- the old and reference velocities
    without autograd, the current one with it and its backward into the LoRA (rank `lora_rank`) --
    in micro-batches of `micro_batch` (the learner takes a whole group per step: the same FLOPs per
    sample in larger kernels), then one AdamW step (the learner: one per epoch). Each callable returns
    its seconds per phase (meaningless on `meta`, where only FLOPs can be counted)."""
    import time

    from peft import LoraConfig

    from stitchvm_rl.policy import LORA_TARGETS

    train_timesteps = train_timesteps or {"terminal": 24, "stitchvm": 11}  # timesteps_per_group at the SD3.5-M configs' settings
    side, dt = resolution // 8, zoo.DTYPES[dtype]
    transformer, vae, clip, value_model, embeds, pooled = sd35m_models(i, j, text_tokens, 1, device, dtype)
    transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    lora = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-4) if device != "meta" else None
    if compile:
        zoo.compile_repeated_blocks(transformer, clip, value_model)

    def velocity(z, t):
        n = len(z)
        return transformer(hidden_states=z, timestep=1000 * t.expand(n), encoder_hidden_states=embeds.expand(n, -1, -1), pooled_projections=pooled.expand(n, -1)).sample

    def clock() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def sample(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = torch.linspace(1, 0, num_steps + 1, device=device)
        z = torch.randn(group, 16, side, side, device=device, dtype=dt)
        with torch.no_grad():
            for k in range(steps):
                z = z + (sigmas[k + 1] - sigmas[k]) * velocity(z, sigmas[k])
        return z, sigmas[steps]

    def score(estimator: str, z: torch.Tensor, tau: torch.Tensor) -> None:
        with torch.no_grad():
            if estimator == "stitchvm":
                value_model.embed(z, tau.expand(len(z)))
                return
            for chunk in z.split(micro_batch):
                pixels = torch.nn.functional.interpolate(vae.decode(chunk).sample, size=(336, 336), mode="bicubic")
                clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)

    def train(estimator: str, anchors: torch.Tensor, tau: torch.Tensor) -> None:
        for n in range(train_timesteps[estimator]):
            t = tau + (1 - tau) * (n + 1) / (train_timesteps[estimator] + 1)
            for anchor in anchors.split(micro_batch):
                z_t = (1 - t) * anchor + t * torch.randn_like(anchor)  # the bridge's cost is the same
                with torch.no_grad():
                    v_old = velocity(z_t, t)  # the official loss's old velocity ...
                    transformer.disable_adapters()
                    v_ref = velocity(z_t, t)  # ... and the reference's, for the KL term
                    transformer.enable_adapters()
                v = velocity(z_t, t)
                ((v.float() - v_old.float()) ** 2 + (v.float() - v_ref.float()) ** 2).mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def group_of(estimator: str):
        def run() -> dict:
            start = clock()
            z, tau = sample(num_steps if estimator == "terminal" else stop)
            sampled = clock()
            score(estimator, z, tau)
            scored = clock()
            train(estimator, z, tau)
            return {"sample": sampled - start, "score": scored - sampled, "train": clock() - scored}

        return run

    return {"terminal": group_of("terminal"), "stitchvm": group_of("stitchvm")}
