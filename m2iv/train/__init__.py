"""Training and evaluating M2IVs: distillation from k-shot multimodal ICL, baselines,
evaluation, teacher cache and data parallelism (DESIGN.md section 1, "Training").

    from m2iv.data import load_task
    from m2iv.train import TrainConfig, train_m2iv
    result = train_m2iv(model, load_task("mytask/"), processor=processor,
                        config=TrainConfig(shots=8, pool_size=256, steps=300))
    result.vectors.save("mytask.safetensors")      # metadata: task, shots, pool, losses, metrics
"""
from .baselines import METHODS, TRAINED_METHODS, mean_activation_vectors, train_method
from .distill import Distiller, Sampler, TrainConfig, TrainResult, train_m2iv
from .evaluate import compare, exact_match, format_table, generate_answers, vqa_normalize
from .teacher_cache import TeacherCache, model_fingerprint

__all__ = ["Distiller", "Sampler", "TrainConfig", "TrainResult", "train_m2iv", "TeacherCache",
           "model_fingerprint", "METHODS", "TRAINED_METHODS", "mean_activation_vectors",
           "train_method", "compare", "exact_match", "format_table", "generate_answers",
           "vqa_normalize"]
