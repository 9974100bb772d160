"""Training and evaluating M2IVs: distillation from k-shot multimodal ICL, baselines,
evaluation, teacher cache and data parallelism (DESIGN.md section 1, "Training").

    from m2iv.data import load_task
    from m2iv.train import train_m2iv
    result = train_m2iv(model, load_task("mytask/"), processor=processor)   # measured defaults
    result.vectors.save("mytask.safetensors")    # metadata: task, shots, losses, metrics, stop

Modules: :mod:`.config` (every knob), :mod:`.sampling` (queries, pool, demonstration sets),
:mod:`.teacher` (the many-shot teacher targets) and :mod:`.teacher_cache` (on disk),
:mod:`.forward` (answer-position forwards), :mod:`.losses`, :mod:`.stopping` (the plateau
rule, the learning-rate schedule), :mod:`.distill` (the loop), :mod:`.checkpoint`,
:mod:`.plots`, :mod:`.baselines`, :mod:`.evaluate`, :mod:`.distributed`.

The public names are imported on first use, so :mod:`.config` (which needs no torch) loads
alone: ``m2iv train --help`` lists the methods and defaults without importing torch.
"""
from .._lazy import lazy_attributes

# public name -> the module defining it (imported by __getattr__ on first access)
_LAZY = {
    "TrainConfig": ".config", "TrainResult": ".config", "METHODS": ".config",
    "TRAINED_METHODS": ".config",
    "Distiller": ".distill", "train_m2iv": ".distill",
    "mean_activation_vectors": ".baselines", "train_method": ".baselines",
    "compare": ".evaluate", "exact_match": ".evaluate", "format_table": ".evaluate",
    "generate_answers": ".evaluate", "vqa_normalize": ".evaluate",
    "Sampler": ".sampling",
    "Teacher": ".teacher", "mean_answer_log_probs": ".teacher",
    "TeacherCache": ".teacher_cache", "model_fingerprint": ".teacher_cache",
}

__all__ = ["Distiller", "Sampler", "TrainConfig", "TrainResult", "train_m2iv", "Teacher",
           "mean_answer_log_probs", "TeacherCache", "model_fingerprint", "METHODS",
           "TRAINED_METHODS", "mean_activation_vectors", "train_method", "compare",
           "exact_match", "format_table", "generate_answers", "vqa_normalize"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
