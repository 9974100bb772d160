"""Every knob of a distillation run, its validation, and what a run returns.

The defaults are chosen by measurement on the digits testbed: ``python -m
benchmarks.fidelity_sweep`` (three label maps that are neither held-out nor family maps, one seed
each, top-1 % on 359 eval queries; ``benchmarks/results/fidelity-sweep-2026-12-03.*``) varies
one factor at a time around batch 128, lr 0.1, KL only, 16 teacher sets and the plateau rule
(96.7 ± 1.0). Batch 8 gives 94.9 ± 0.8; lr 0.3 diverges on one map (worst 7.2) while lr 0.03
matches 0.1 (96.7); no lr decay at the plateau 95.4 ± 2.3; one teacher set 95.8, four 96.6, 32
96.1, so four (a quarter of the teacher cost of 16). The CE and synergy terms do not beat the KL
alone (see :mod:`m2iv.train.losses`). The step cap (2000) is a safety net: the plateau rule
stopped every run of the sweep within 975 steps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["TrainConfig", "TrainResult", "SYNERGY_MODES", "SCHEDULES",
           "TRAINED_METHODS", "METHODS"]

SYNERGY_MODES = ("align", "decorr", "both", "none")
SCHEDULES = ("plateau", "cosine")
#: the trained methods as :class:`TrainConfig` overrides (M2IV, its baselines and ablations)
TRAINED_METHODS: dict[str, dict] = {
    "m2iv": {},
    "live": {"train_mha": False, "synergy_weight": 0.0, "ce_weight": 0.0},
    "mha-only": {"train_mlp": False},
    "mlp-only": {"train_mha": False},
}
#: every method ``m2iv train --method`` accepts (mean-activation is training-free)
METHODS = ("mean-activation", *TRAINED_METHODS)


@dataclass
class TrainConfig:
    """Every knob of a distillation run (saved in checkpoints and in the vectors' metadata).

    Stopping: with ``eval_every > 0`` and ``val_queries > 0`` the run holds ``val_queries``
    training queries out as a validation set and evaluates the held-out KL to the teacher on
    them every ``eval_every`` steps. ``schedule="plateau"``: constant learning rate after the
    warm-up; after ``patience`` evaluations without a relative KL improvement of ``min_delta``
    the learning rate is multiplied by ``plateau_decay`` (up to ``plateau_decays`` times) and
    the next plateau stops the run. ``schedule="cosine"``: cosine decay over ``steps``, stopped
    at the first plateau. ``steps`` is the cap either way; the best evaluated vectors are kept.
    ``patience=None`` (or no validation) trains exactly ``steps`` steps.
    """

    # task
    shots: int = 16
    pool_size: int | None = None  # None: the whole pool split
    teacher_sets: int = 4  # demonstration sets averaged into each query's teacher target
    # optimisation
    steps: int = 2000  # the step cap
    batch_size: int = 128  # queries per micro-batch (global, over all ranks)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.1
    lr_scale: str | float = "auto"  # "auto" (residual-stream RMS) or a number
    gate_lr: float | None = None  # default: lr
    weight_decay: float = 0.0
    warmup: float = 20  # steps (>= 1) or a fraction of ``steps`` (< 1)
    schedule: str = "plateau"  # "plateau" | "cosine"
    min_lr_ratio: float = 0.0  # cosine floor
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    # losses
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    synergy_weight: float = 0.0
    synergy: str = "decorr"  # "decorr" | "align" | "both" | "none" (see losses.py)
    decorr_weight: float = 1.0  # weight of the decorrelation inside the synergy term
    temperature: float = 1.0
    # what is trained (baselines and ablations)
    train_mha: bool = True
    train_mlp: bool = True
    train_gates: bool = True
    layers: tuple[int, ...] | None = None  # None: every steerable layer
    positions: str = "all"  # steered tokens of the student ("all" or "text")
    backend: str = "auto"
    # stopping and evaluation
    seed: int = 0
    eval_every: int = 25  # 0: no periodic evaluation (then exactly ``steps`` steps)
    val_queries: int = 128  # train queries held out for the plateau rule (<= 1/4 of them)
    patience: int | None = 4  # evaluations without improvement; None: never stop early
    min_delta: float = 0.01  # relative improvement of the held-out KL that counts
    plateau_decay: float = 0.3
    plateau_decays: int = 1
    keep_best: bool | None = None  # None: True when the plateau rule is on
    eval_queries: int | None = 64  # eval-split queries for the final metrics (None: all)
    # mechanics
    checkpoint_path: str | None = None
    checkpoint_every: int = 0
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    amp: str = "auto"  # "auto" (bf16 autocast on CUDA for fp32 models), "bf16", "none"
    teacher_batch_size: int | None = None  # rows per teacher forward (default batch_size)
    log_path: str | None = None
    plot_path: str | None = None
    progress: bool = True
    task: str | None = None
    method: str = "m2iv"

    def __post_init__(self):
        if self.shots < 1:
            raise ValueError(f"shots must be >= 1 (the teacher needs demonstrations); got "
                             f"{self.shots}")
        if self.teacher_sets < 1:
            raise ValueError(f"teacher_sets must be >= 1; got {self.teacher_sets}")
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps >= 0, batch_size >= 1 and grad_accum >= 1 are required")
        if self.synergy not in SYNERGY_MODES:
            raise ValueError(f"synergy must be one of {', '.join(SYNERGY_MODES)}; got "
                             f"{self.synergy!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got "
                             f"{self.schedule!r}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'none'; got {self.amp!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None (never stop early); got "
                             f"{self.patience}")
        if not 0 < self.plateau_decay < 1 and self.plateau_decays > 0:
            raise ValueError(f"plateau_decay={self.plateau_decay} is not in (0, 1)")
        if self.eval_every < 0 or self.val_queries < 0:
            raise ValueError("eval_every and val_queries must be >= 0")
        if not (self.train_mha or self.train_mlp):
            raise ValueError("nothing to train: train_mha and train_mlp are both False")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        self.betas = tuple(self.betas)

    @property
    def uses_align(self) -> bool:
        return self.synergy_weight > 0 and self.synergy in ("align", "both")

    @property
    def uses_decorr(self) -> bool:
        return (self.synergy_weight > 0 and self.decorr_weight > 0
                and self.synergy in ("decorr", "both") and self.train_mha and self.train_mlp)

    @property
    def validates(self) -> bool:
        """Whether the run holds out validation queries and evaluates on them."""
        return self.eval_every > 0 and self.val_queries > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def losses_meta(self) -> dict:
        return {"kl_weight": self.kl_weight, "ce_weight": self.ce_weight,
                "synergy_weight": self.synergy_weight, "synergy": self.synergy,
                "decorr_weight": self.decorr_weight, "temperature": self.temperature}


@dataclass
class TrainResult:
    """What a run returns: the vectors (with metadata), the log, the final metrics, the steps
    taken and why it stopped (``"plateau"``, ``"step cap"`` or ``"steps"``)."""

    vectors: Any  # M2IV
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    steps: int = 0
    stopped_early: bool = False
    stop_reason: str = ""
