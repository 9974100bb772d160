"""An ICL-capable tiny LVLM testbed on scikit-learn's 8x8 digits.

The model is a standard ``transformers.LlavaForConditionalGeneration`` (llama text model, hidden
128, 4 layers; CLIP vision tower, hidden 64, 2 layers), pre-trained from scratch on episodes of
(digit image, label token) pairs whose digit -> label map changes per episode, so the answer to a
query is only knowable from the demonstrations: genuine multimodal in-context learning. The
trained weights ship with the package (``checkpoints/``, safetensors).

    from m2iv.testbed import load_testbed, label_logits, evaluate_icl
    model, task = load_testbed("1tok")        # frozen model (eval mode), TestbedTask
    teacher, student = task.sample_prompts("heldout0", k=16, batch_size=32, seed=0)
    label_logits(model, teacher)              # FloatTensor[32, 10]
    evaluate_icl(model, task, "heldout0")     # {k: accuracy} for k = 0, 1, 2, 4, 8, 16

Two settings share one checkpoint: (a) novel mapping, the held-out permutations ``"heldout0"``
.. ``"heldout7"``; (b) task identification, the family maps ``"identity"``, ``"reverse"``,
``"succ"``, ``"shift5"``, ``"parity"``. Images: ``"train"`` split for pre-training only,
``"demo"`` (demonstrations) and ``"test"`` (queries) held out.
"""
from __future__ import annotations

from .data import (FAMILY_FRACTION, Curriculum, DigitData, EpisodeSampler, family_maps,
                   get_data, heldout_maps)
from .model import (BOS_ID, IMAGE_ID, LABEL_IDS, LABEL_OFFSET, PAD_ID, VARIANTS,
                    TestbedModelConfig, build_model, load_model)
from .task import PromptBatch, TestbedTask


_ICL = ("KS", "accuracy", "evaluate_icl", "icl_table", "label_logits")


def __getattr__(name):
    # lazy, so that `python -m m2iv.testbed.icl` does not find the module already imported
    if name in _ICL:
        from . import icl

        return getattr(icl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_testbed(variant: str = "1tok", directory: str | None = None, device="cpu",
                 dtype=None):
    """Load the shipped (or a given ``directory``'s) checkpoint.

    Returns ``(model, task)``: a frozen ``LlavaForConditionalGeneration`` in eval mode and the
    :class:`TestbedTask` that builds its prompts.
    """
    import torch

    model = load_model(variant, directory, device=device, dtype=dtype or torch.float32)
    return model, TestbedTask(model.testbed_config)


__all__ = [
    "BOS_ID", "Curriculum", "DigitData", "EpisodeSampler", "FAMILY_FRACTION", "IMAGE_ID", "KS",
    "LABEL_IDS", "LABEL_OFFSET", "PAD_ID", "PromptBatch", "TestbedModelConfig", "TestbedTask",
    "VARIANTS", "accuracy", "build_model", "evaluate_icl", "family_maps", "get_data",
    "heldout_maps", "icl_table", "label_logits", "load_model", "load_testbed",
]
