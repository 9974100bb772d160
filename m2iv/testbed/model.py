"""The testbed model: a standard ``LlavaForConditionalGeneration`` small enough to train on a CPU.

A llama text model (hidden 128, 4 layers, 4 heads, MLP 512) reads a CLIP vision tower (hidden 64,
2 layers, 1 input channel) through the usual LLaVA projector. Images are the 8x8 digits of
scikit-learn, standardised per pixel. Two variants differ only in the vision patch size:

* ``"1tok"``: one 8x8 patch, so one image token per image (the cheap, default variant);
* ``"4tok"``: four 4x4 patches, so four image tokens per image.

The vocabulary (16 ids) is tiny and fixed: see :data:`PAD_ID`, :data:`BOS_ID`, :data:`IMAGE_ID`,
:data:`SEP_ID`, :data:`LABEL_OFFSET`. Label ``j`` (0..9) is token ``LABEL_OFFSET + j``. Ids 14 and
15 are reserved and never used.

Nothing here downloads anything: the model is built from a config and its weights are loaded from
the shipped safetensors file (see :func:`load_model`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

PAD_ID = 0
BOS_ID = 1
IMAGE_ID = 2
SEP_ID = 3  # reserved separator id (the prompts built by this package do not use it)
LABEL_OFFSET = 4
NUM_LABELS = 10
VOCAB_SIZE = 16
LABEL_IDS = tuple(range(LABEL_OFFSET, LABEL_OFFSET + NUM_LABELS))

VARIANTS = ("1tok", "4tok")
CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


@dataclass
class TestbedModelConfig:
    """Every number that defines the architecture; written next to the weights as JSON."""

    __test__ = False  # not a pytest class

    variant: str = "1tok"
    image_size: int = 8
    patch_size: int = 8  # 8 -> 1 image token per image, 4 -> 4 tokens
    # text model (llama)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # vision tower (CLIP)
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 256
    num_channels: int = 1
    vision_feature_layer: int = -1
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def for_variant(cls, variant: str) -> "TestbedModelConfig":
        if variant not in VARIANTS:
            raise ValueError(f"unknown testbed variant {variant!r}; expected one of {VARIANTS}")
        return cls(variant=variant, patch_size=8 if variant == "1tok" else 4)

    def to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str) -> "TestbedModelConfig":
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def llava_config(cfg: TestbedModelConfig):
    """The ``transformers.LlavaConfig`` for ``cfg`` (a llama text model and a CLIP vision tower)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        num_channels=cfg.num_channels,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_seq_length=cfg.tokens_per_image,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drop CLIP's CLS token
        vision_feature_layer=cfg.vision_feature_layer,
        tie_word_embeddings=False,
    )


def build_model(cfg: TestbedModelConfig | str = "1tok", seed: int | None = 0):
    """A randomly initialised ``LlavaForConditionalGeneration`` for ``cfg`` (float32, CPU).

    ``seed`` fixes the initialisation (``None`` leaves the global RNG alone).
    """
    from transformers import LlavaForConditionalGeneration

    if isinstance(cfg, str):
        cfg = TestbedModelConfig.for_variant(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(cfg))
    model.testbed_config = cfg
    return model


def checkpoint_paths(variant: str, directory: str | None = None) -> tuple[str, str]:
    """``(weights.safetensors, config.json)`` paths of a checkpoint."""
    directory = directory or CHECKPOINT_DIR
    return (os.path.join(directory, f"testbed_{variant}.safetensors"),
            os.path.join(directory, f"testbed_{variant}.json"))


def save_model(model, variant: str, directory: str | None = None, meta: dict | None = None):
    """Write the weights (safetensors, fp32) and the config JSON (with ``meta`` under ``extra``)."""
    from safetensors.torch import save_file

    directory = directory or CHECKPOINT_DIR
    os.makedirs(directory, exist_ok=True)
    wpath, cpath = checkpoint_paths(variant, directory)
    state = {k: v.detach().to(torch.float32).contiguous().clone()
             for k, v in model.state_dict().items()}
    save_file(state, wpath, metadata={"format": "pt", "variant": variant})
    cfg: TestbedModelConfig = model.testbed_config
    if meta:
        cfg.extra = dict(cfg.extra, **meta)
    cfg.to_json(cpath)
    return wpath, cpath


def load_model(variant: str = "1tok", directory: str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Build the model from its config JSON and load the shipped weights (strictly).

    Returns a ``LlavaForConditionalGeneration`` in eval mode with ``requires_grad`` off for every
    parameter (the M2IV setting: the model is frozen). ``model.testbed_config`` holds the config.
    """
    from safetensors.torch import load_file

    wpath, cpath = checkpoint_paths(variant, directory)
    if not os.path.exists(wpath):
        raise FileNotFoundError(
            f"no testbed checkpoint at {wpath}; train one with "
            f"`python -m m2iv.testbed.pretrain --variant {variant}`")
    cfg = TestbedModelConfig.from_json(cpath)
    model = build_model(cfg, seed=None)
    state = load_file(wpath)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied or derived buffers (e.g. CLIP's position_ids) may legitimately be absent.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"testbed checkpoint {wpath} does not fit the model: "
                           f"missing {missing}, unexpected {unexpected}")
    model.to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
