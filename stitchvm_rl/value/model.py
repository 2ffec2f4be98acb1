"""`StitchedValueModel`: V(z_t, t, prompt) for noisy SD3 latents, stitched from two pretrained networks.

    z_t, t --[DiT head: SD3 blocks 1..i, conditioned on the empty prompt or the prompt]--> h (B, C_dit, h, w)
           --[stitch s(h) = Up(F h) + G(Up(F h))]--> tokens on the reward model's patch grid
           --[reward-model tail: CLIP vision layers j..L, post-LN, projection]--> image embedding
           --[value head: cosine with the prompt's CLIP text embedding | aesthetic MLP | scalar]--> V

The head reads the empty prompt (the paper's choice: then it is the first blocks of CFG's
unconditional pass) or, with `head_conditioning="prompt"`, the prompt the latent is being sampled
for, passed in as the policy's own SD3 embedding (`cond=policy.encode_prompts(prompts)`): an
empty-prompt head sees only the posterior mixed over all prompts, which at high noise cannot tell
which prompt-consistent image a latent is heading to (README, "What is known").

Block indices count from 1 as in the paper. For j = 1 the stitched tokens replace CLIP's patch
embedding (CLS token, position embeddings and pre-LayerNorm are then applied as in CLIP); for j > 1
they replace the patch tokens entering layer j, beside a learned CLS token.

Saved as `value_model.json` (architecture, the backbone and reward model it was stitched from, a
fingerprint of the head weights) + `value_model.safetensors` (stitch, tail, head, empty-prompt
embedding). The frozen DiT head and CLIP text tower are re-read from their sources at load time and
checked against the fingerprint, so a value model never silently runs on another backbone.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from stitchvm_rl import storage, zoo
from stitchvm_rl.config import ConfigError
from stitchvm_rl.policy import PromptEmbeds, tensor_checksum
from stitchvm_rl.value import TOYWORLD_VALUE_NAME, value_model_path
from stitchvm_rl.rewards import AestheticMLP

CONFIG_FILE = "value_model.json"
WEIGHTS_FILE = "value_model.safetensors"
# Frozen parts re-read from the backbone / reward-model sources instead of being saved again
# (head.blocks are saved when they were trained: `head_trained`).
FROZEN = ("head.blocks", "head.pos_embed", "head.time_text_embed", "head.context_embedder", "text_model", "text_projection")


class DiTHead(nn.Module):
    """The first `i` joint blocks of a frozen SD3 transformer, conditioned on the empty prompt or on
    the given prompt embeddings. `share=True` uses the transformer's own modules instead of copies
    (the stage-1 search reads every block's features; a copy would double the transformer)."""

    def __init__(self, transformer, i: int, null_embeds: torch.Tensor, null_pooled: torch.Tensor, share: bool = False):
        super().__init__()
        if getattr(transformer, "peft_config", None):
            raise ValueError("the DiT head must copy the *base* transformer, not one carrying LoRA adapters")
        n = len(transformer.transformer_blocks)
        if not 1 <= i <= n:
            raise ValueError(f"DiT block i={i} is outside 1..{n}")
        own = (lambda m: m) if share else copy.deepcopy
        self.pos_embed = own(transformer.pos_embed)
        self.time_text_embed = own(transformer.time_text_embed)
        self.context_embedder = own(transformer.context_embedder)
        self.blocks = nn.ModuleList(own(transformer.transformer_blocks[b]) for b in range(i))
        self.patch_size = transformer.config.patch_size
        self.width = transformer.inner_dim
        self.register_buffer("null_embeds", null_embeds.detach().clone())
        self.register_buffer("null_pooled", null_pooled.detach().clone())
        self.requires_grad_(False)

    def features(self, z: torch.Tensor, t: torch.Tensor, upto: int | None = None, cond: PromptEmbeds | None = None) -> list[torch.Tensor]:
        """Image tokens after each block 1..upto as (B, C, h, w) grids (h = H / patch); `cond`: the
        prompt embeddings to read (None: the empty prompt)."""
        b, _, height, width = z.shape
        t = t.to(z.device, torch.float32).expand(b)  # float32 into the time embedder, as SD3Policy.velocity
        embeds, pooled = (self.null_embeds.expand(b, -1, -1), self.null_pooled.expand(b, -1)) if cond is None else (cond.embeds, cond.pooled)
        hidden = self.pos_embed(z).contiguous()
        temb = self.time_text_embed(1000 * t, pooled.to(z.device, z.dtype))
        enc = self.context_embedder(embeds.to(z.device, z.dtype))
        out = []
        for block in self.blocks[: upto or len(self.blocks)]:
            enc, hidden = block(hidden_states=hidden, encoder_hidden_states=enc, temb=temb)
            out.append(self.grid(hidden, height, width))
        return out

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds | None = None) -> torch.Tensor:
        return self.features(z, t, cond=cond)[-1]

    def grid(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Image tokens (B, h*w, C) of latents of side (height, width) as a (B, C, h, w) grid."""
        return tokens.transpose(1, 2).reshape(len(tokens), -1, height // self.patch_size, width // self.patch_size)

    def matches(self, transformer) -> bool:
        """Whether this head is `transformer`'s own first blocks (same weights, no adapters), so that
        the transformer's pass computes it on the way."""
        if getattr(transformer, "peft_config", None):
            return False
        theirs = dict(transformer.named_parameters())
        for name, mine in self.named_parameters():
            other = theirs.get(name.replace("blocks.", "transformer_blocks.", 1) if name.startswith("blocks.") else name)
            if other is None or other.shape != mine.shape or not torch.equal(other.to(mine), mine):
                return False
        return True


@contextmanager
def capture_head_features(transformer, i: int):
    """Within this context, a pass of the SD3 `transformer` hands the image tokens after its block i
    (under autograd) to the caller, and the rest of the pass a detached copy: its first i blocks then
    double as a value model's DiT head, and the blocks after i build no graph.

        with capture_head_features(policy.transformer, i) as tokens, torch.enable_grad():
            v = policy.velocity(z, t, cond)            # tokens[0]: (B, h*w, C), differentiable in z
    """
    captured: list[torch.Tensor] = []

    def hand_over(module, args, output):
        enc, hidden = output
        captured.append(hidden)
        return (enc.detach() if enc is not None else None), hidden.detach()

    handle = transformer.transformer_blocks[i - 1].register_forward_hook(hand_over)
    try:
        yield captured
    finally:
        handle.remove()


class Stitch(nn.Module):
    """s(h) = Up(F h) + G(Up(F h)): 1x1 conv F, bilinear Up to the reward grid, residual bottleneck G."""

    def __init__(self, c_in: int, c_out: int, grid: int, bottleneck: int = 8):
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(c_in, c_out, 1)  # F, initialised by least squares (stage 1)
        self.refine = nn.Sequential(  # G; zero last layer: G = 0 at init
            nn.SiLU(), nn.Conv2d(c_out, c_out // bottleneck, 1), nn.SiLU(), nn.Conv2d(c_out // bottleneck, c_out, 1)
        )
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-2:] == (self.grid, self.grid):
            return h
        return F.interpolate(h, size=(self.grid, self.grid), mode="bilinear", align_corners=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.up(self.proj(h))
        return u + self.refine(u)


class CLIPTail(nn.Module):
    """CLIP vision layers j..L on stitched patch tokens, then post-LayerNorm of CLS and projection."""

    def __init__(self, clip_model, j: int):
        super().__init__()
        vision = clip_model.vision_model
        n = len(vision.encoder.layers)
        if not 1 <= j <= n:
            raise ValueError(f"reward-model block j={j} is outside 1..{n}")
        self.j = j
        emb = vision.embeddings
        self.class_embedding = nn.Parameter(emb.class_embedding.detach().clone())
        if j == 1:  # stitched tokens stand for the patch embedding: CLIP's own tokenisation follows
            self.position_embedding = copy.deepcopy(emb.position_embedding)
            self.pre_layrnorm = copy.deepcopy(vision.pre_layrnorm)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in vision.encoder.layers[j - 1 :])
        self.post_layernorm = copy.deepcopy(vision.post_layernorm)
        self.visual_projection = copy.deepcopy(clip_model.visual_projection)

    def forward(self, grid_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, g, g) -> (image embedding (B, P), last hidden state (B, 1 + g*g, C))."""
        tokens = grid_tokens.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        hidden = torch.cat([cls, tokens], dim=1)
        if self.j == 1:
            hidden = self.pre_layrnorm(hidden + self.position_embedding.weight.to(hidden.dtype))
        for layer in self.layers:
            hidden = layer(hidden, None)
        return self.visual_projection(self.post_layernorm(hidden[:, 0])), hidden


def clip_reference_features(clip_model, pixels: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What CLIP itself feeds into block j for these pixel values: (patch grid (B, C, g, g), CLS (B, C)).

    j = 1: the raw patch-embedding output (before CLS, positions, pre-LN); j > 1: hidden state entering
    layer j. The stitch search regresses on these; `CLIPTail` consumes the same quantity.
    """
    vision = clip_model.vision_model
    emb = vision.embeddings.patch_embedding(pixels.to(vision.embeddings.patch_embedding.weight.dtype))
    if j == 1:
        return emb, vision.embeddings.class_embedding.expand(pixels.shape[0], -1)
    hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[j - 1]
    g = emb.shape[-1]
    return hidden[:, 1:].transpose(1, 2).reshape(pixels.shape[0], -1, g, g), hidden[:, 0]


@dataclass
class ValueModelConfig:
    """Everything needed to rebuild a value model; saved as value_model.json."""

    dit_block: int
    rm_block: int
    head: str  # "clip" | "aesthetic" | "scalar"
    backbone: str
    reward_model: str
    backbone_fingerprint: str
    score_scale: float = 1.0
    head_conditioning: str = "empty"  # "empty" | "prompt"
    head_trained: bool = False  # stage 2 trained the head's blocks too (saved with the model)
    embed_target: str = "unit"  # "unit" (the paper's) | "mean": see `StitchedValueModel.embed`
    embed_scale: float = 1.0  # embed_target=mean: the clean reward model's typical raw embedding norm
    rm_grid: int = 0
    stitch_mse: dict = field(default_factory=dict)


class StitchedValueModel(nn.Module):
    """V(z_t, t, prompt): DiT head (frozen unless `head_trained`) -> stitch -> reward tail -> value head."""

    def __init__(self, config: ValueModelConfig, head: DiTHead, clip_model, tokenizer=None):
        super().__init__()
        if config.head not in ("clip", "aesthetic", "scalar"):
            raise ValueError(f"unknown value head '{config.head}'; choose clip, aesthetic or scalar")
        if config.head_conditioning not in ("empty", "prompt"):
            raise ValueError(f"unknown head_conditioning '{config.head_conditioning}'; choose empty or prompt")
        if config.embed_target not in ("unit", "mean"):
            raise ValueError(f"unknown embed_target '{config.embed_target}'; choose unit or mean")
        self.config = config
        self.head = head
        c_rm = clip_model.config.vision_config.hidden_size
        vcfg = clip_model.config.vision_config
        config.rm_grid = config.rm_grid or vcfg.image_size // vcfg.patch_size
        self.stitch = Stitch(head.width, c_rm, config.rm_grid)
        self.tail = CLIPTail(clip_model, config.rm_block)
        proj = clip_model.config.projection_dim
        self.aesthetic = AestheticMLP(proj) if config.head == "aesthetic" else None
        self.scalar = nn.Linear(proj, 1) if config.head == "scalar" else None
        # the reward model's text side (frozen) scores the prompt for the CLIP head
        self.text_model = clip_model.text_model.requires_grad_(False) if config.head == "clip" else None
        self.text_projection = clip_model.text_projection.requires_grad_(False) if config.head == "clip" else None
        self.tokenizer = tokenizer
        self._text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ forward
    def embed(self, z_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embedding (B, P), reward-tail hidden states) of noisy latents; `cond`: the policy's
        embeddings of the latents' prompts (needed when the head reads the prompt).

        The distillation loss compares this embedding with the clean image's unit embedding e, so
        its minimiser is, with embed_target=unit (the paper's), normalize(E[e | z_t]), and with
        embed_target=mean (no normalisation, a fixed scale), E[e | z_t] itself. A cosine score is
        linear in e, so only `mean` scores E[score | z_t]; `unit` inflates latents whose outcome is
        still open (|E[e]| < 1), which at high noise reorders a prompt's group."""
        channels, patch = self.head.pos_embed.proj.in_channels, self.head.patch_size
        if z_t.dim() != 4 or z_t.shape[1] != channels or z_t.shape[2] % patch or z_t.shape[3] % patch:
            raise ValueError(f"latents of shape {tuple(z_t.shape)} do not fit this value model: its backbone takes (B, {channels}, H, W) with H and W multiples of {patch}")
        if t.dim() > 1 or t.numel() not in (1, len(z_t)):
            raise ValueError(f"noise levels of shape {tuple(t.shape)} do not fit {len(z_t)} latents; pass one per latent, or one for all")
        return self.embed_grid(self.head(z_t, t, self._head_cond(cond, len(z_t))))

    def embed_grid(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`embed` from the DiT head's output grid (B, C, h, w) on."""
        emb, hidden = self.tail(self.stitch(grid))
        if self.config.embed_target == "mean":
            return emb.float() / self.config.embed_scale, hidden
        return F.normalize(emb.float(), dim=-1), hidden

    def _head_cond(self, cond: PromptEmbeds | None, n: int) -> PromptEmbeds | None:
        if self.config.head_conditioning == "empty":
            return None
        if cond is None:
            raise ValueError("this value model's DiT head reads the prompt (head_conditioning=prompt); pass the policy's prompt embeddings: cond=policy.encode_prompts(prompts)")
        if len(cond) != n:
            raise ValueError(f"{len(cond)} prompt embeddings do not fit {n} latents; pass one per latent")
        return cond

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            tok = self.tokenizer(missing, padding="max_length", truncation=True, return_tensors="pt").to(self.device)
            pooled = self.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
            self._text_cache.update(zip(missing, F.normalize(self.text_projection(pooled).float(), dim=-1)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def score(self, image_embeds: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """The value head on normalised image embeddings (the same head the clean reward uses)."""
        if self.config.head == "clip":
            return self.config.score_scale * (image_embeds * self.text_embeds(prompts)).sum(-1)
        if self.config.head == "aesthetic":
            return self.aesthetic(image_embeds)
        return self.scalar(image_embeds).squeeze(-1)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, prompts: list[str] | None = None, cond: PromptEmbeds | None = None) -> torch.Tensor:
        """V(z_t, t, prompt) -> (B,). Differentiable in z_t; wrap in no_grad when scoring. `cond`: the
        policy's embeddings of `prompts` (`policy.encode_prompts(prompts)`), read by a prompt-conditioned head."""
        return self.score(self.embed(z_t, t, cond)[0], prompts)

    @property
    def device(self) -> torch.device:
        return self.stitch.proj.weight.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Stage 2 trains the stitch, the reward tail and a scalar head; the DiT head's blocks only
        when `config.head_trained` (otherwise they stay the base model's)."""
        params = list(self.stitch.parameters()) + list(self.tail.parameters())
        params += list(self.head.blocks.parameters()) if self.config.head_trained else []
        return params + (list(self.scalar.parameters()) if self.scalar is not None else [])

    # ------------------------------------------------------------ build / save / load
    @classmethod
    def from_parts(cls, pipe, clip: zoo.CLIPBundle, i: int, j: int, head: str, backbone: str, reward_model: str, score_scale: float = 1.0, head_conditioning: str = "empty", embed_target: str = "unit", embed_scale: float = 1.0, null: tuple[torch.Tensor, torch.Tensor] | None = None) -> StitchedValueModel:
        """A fresh value model at (i, j) from a loaded SD3 pipeline and CLIP (F at default init);
        `null`: the empty prompt's embeddings when the pipeline's text encoders are already dropped."""
        dit = DiTHead(pipe.transformer, i, *(null or null_prompt_embeds(pipe)))
        config = ValueModelConfig(i, j, head, backbone, reward_model, head_fingerprint(dit), score_scale, head_conditioning, embed_target=embed_target, embed_scale=embed_scale)
        return cls(config, dit, clip.model, clip.tokenizer).to(pipe.transformer.device)

    def save(self, path: str | Path) -> Path:
        """Write value_model.json + value_model.safetensors (trained parts only) atomically."""
        frozen = tuple(f for f in FROZEN if not (self.config.head_trained and f == "head.blocks"))
        keep = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith(frozen)}

        def write(tmp: Path) -> None:
            save_file(keep, str(tmp / WEIGHTS_FILE), metadata={"checksum": tensor_checksum(keep)})
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

        return zoo.write_dir_atomically(Path(path), write, overwrite=True)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str = "float32") -> StitchedValueModel:
        """Load a saved value model (a directory, a storage URI or the committed toy one's name); its
        backbone and reward model are read from their recorded sources."""
        path = value_model_path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"'{path}' is not a value model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}); build one with jobs/stitch.py")
        config = ValueModelConfig(**json.loads((path / CONFIG_FILE).read_text()))
        weights = load_file(str(path / WEIGHTS_FILE))
        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            expected = (f.metadata() or {}).get("checksum")
        if expected != tensor_checksum(weights):
            raise ValueError(f"value model weights in '{path}' fail their checksum: the file is truncated or corrupted")
        transformer = zoo.load_sd3_transformer(config.backbone)
        dit = DiTHead(transformer, config.dit_block, weights["head.null_embeds"], weights["head.null_pooled"])
        if head_fingerprint(dit) != config.backbone_fingerprint:
            raise ValueError(
                f"the value model in '{path}' was stitched from another version of backbone '{config.backbone}' "
                "(head weights differ); rebuild it with jobs/stitch.py for this backbone"
            )
        clip = zoo.load_clip(config.reward_model)
        model = cls(config, dit, clip.model, clip.tokenizer)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.startswith(FROZEN)]:
            raise ValueError(f"value model weights in '{path}' do not match its config (unexpected {unexpected[:3]})")
        return model.to(device, zoo.DTYPES[dtype]).eval()


@torch.no_grad()
def null_prompt_embeds(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's embedding of the empty prompt (all three text encoders): the head's fixed conditioning,
    identical to the unconditional branch of CFG."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        [""], None, None, device=pipe.transformer.device, do_classifier_free_guidance=False,
        max_sequence_length=min(pipe.tokenizer_3.model_max_length, 256),
    )
    return embeds, pooled


def head_fingerprint(head: DiTHead) -> str:
    """Checksum of the frozen DiT head's weights in float32 (independent of the load dtype)."""
    return tensor_checksum({k: v.float() for k, v in head.state_dict().items() if not k.startswith("null_")})


def check_value_model_dir(path: str | Path, backbone: str) -> None:
    """Refuse (ConfigError), before anything is loaded, a value-model directory that is missing, malformed,
    or was stitched from another backbone than the policy's (its values would not describe this policy's latents).
    A storage URI is checked where it is (its config file only; the nodes download the rest)."""
    source = str(path)
    local = value_model_path(source) if source == TOYWORLD_VALUE_NAME else None
    try:
        text = storage.read_text(str(local or source), CONFIG_FILE)
    except OSError as err:
        raise ConfigError(f"value model '{path}' cannot be reached ({type(err).__name__}: {str(err).splitlines()[0]}); check the storage credentials and endpoint") from None
    if text is None:
        raise ConfigError(f"value model '{path}' does not exist; build one with `python jobs/stitch.py` and pass its value_model/ directory (or its storage URI)")
    try:
        recorded = json.loads(text)["backbone"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"value model '{path}' has a malformed {CONFIG_FILE} ({type(err).__name__}: {err}); rebuild it with `python jobs/stitch.py`") from None
    if _source_key(recorded) != _source_key(backbone):
        raise ConfigError(
            f"value model '{path}' was stitched from backbone '{recorded}' but the policy is '{backbone}'; "
            f"build one for this policy with `python jobs/stitch.py backbone={backbone}`"
        )


def _source_key(source: str) -> str:
    """A model source as comparable text: an existing directory by its real path, anything else as written."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source
