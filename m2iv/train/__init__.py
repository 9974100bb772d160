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
"""
from .baselines import METHODS, TRAINED_METHODS, mean_activation_vectors, train_method
from .config import TrainConfig, TrainResult
from .distill import Distiller, train_m2iv
from .evaluate import compare, exact_match, format_table, generate_answers, vqa_normalize
from .sampling import Sampler
from .teacher import Teacher, mean_answer_log_probs
from .teacher_cache import TeacherCache, model_fingerprint

__all__ = ["Distiller", "Sampler", "TrainConfig", "TrainResult", "train_m2iv", "Teacher",
           "mean_answer_log_probs", "TeacherCache", "model_fingerprint", "METHODS",
           "TRAINED_METHODS", "mean_activation_vectors", "train_method", "compare",
           "exact_match", "format_table", "generate_answers", "vqa_normalize"]
