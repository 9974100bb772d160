"""The distillation losses (DESIGN.md section 1, "Training").

All functions take per-token tensors at the answer positions and a mask ``[B, A]`` of real
answer tokens, and return the **sum over queries of the per-query mean over answer tokens**;
the caller divides by the number of queries in the whole (global) batch, so that micro-batches
and data-parallel ranks add up to exactly the single-process mean.

* :func:`mimicry_kl`: ``KL(teacher || student)`` of the next-token distributions at temperature
  ``tau`` (scaled by ``tau**2`` so gradient magnitudes do not depend on ``tau``).
* :func:`answer_ce`: cross-entropy of the student on the answer tokens.
* :func:`hidden_alignment`: per-layer relative squared error between the student's and the
  teacher's decoder-layer outputs (the residual stream) at the answer positions.
* :func:`branch_decorrelation`: mean over layers of ``cos^2`` between the MHA vector's
  residual-space contribution ``c_l = W_o (alpha_l * a_l)`` and the MLP vector ``beta_l b_l``.

**The default loss is the mimicry KL alone** (``ce_weight = synergy_weight = 0``); the CE and
synergy terms stay available. Measured by ``python -m benchmarks.fidelity_sweep`` (three unseen
label maps of the digits testbed, converged runs, top-1 on 359 eval queries,
``benchmarks/results/fidelity-sweep-2026-12-03.json``): KL only 96.7 ± 1.0; + CE 1.0
96.1 ± 1.3; + decorrelation 0.1 96.6 ± 0.4; + alignment 0.1 96.1 ± 1.8; KL + CE 1.0 +
decorrelation 0.1 (the previous default) 96.5 ± 0.6. None beats the KL alone by more than the
spread, so none is on by default. (Under the previous fixed 300-step budget the decorrelation
did help, 0.92 vs 1.09 held-out KL; with training run to convergence that advantage is gone.)

The synergy term (``TrainConfig.synergy``, weighted by ``synergy_weight``) is one of
``"decorr"``: ``decorr_weight * branch_decorrelation``; ``"align"``: ``hidden_alignment``;
``"both"``: their sum; ``"none"``. What each is for:

* *Decorrelation asks the two branches to be complementary rather than redundant.* Within a
  layer both vectors end up in the same residual stream, so any direction they share can be
  split between them arbitrarily, or grow in both with opposite signs while cancelling.
  Penalising ``cos^2`` between the two residual-space contributions removes that degeneracy.
  It is scale-free (a cosine), so it never fights the other losses over norms. For head-space
  ("sandwich", Gemma 3) layers, where a norm follows ``o_proj``, ``W_o a`` is still the
  direction the MHA vector pushes before that norm. On the testbed the branches are already
  complementary without it: jointly trained (KL only) they reach 96.7, the MLP branch alone
  95.6 ± 0.6 and the MHA branch alone 87.6 ± 8.4 (same file).
* *Alignment gives every layer its own target.* The mimicry KL only sees the last layer, so
  it is satisfied by many vector sets; asking each steered layer's output to match the
  teacher's at the answer positions (MimIC-style) pins the layers down individually. At the
  answer positions the teacher's hidden states carry the specific demonstrations of each
  prompt, which no zero-shot student can reproduce.
"""
from __future__ import annotations

import torch

__all__ = ["mimicry_kl", "answer_ce", "hidden_alignment", "branch_decorrelation",
           "per_query_mean"]


def per_query_mean(tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, A]`` per-token values -> ``[B]`` mean over each query's real tokens."""
    m = mask.to(tok.dtype)
    return (tok * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def mimicry_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, reduce: bool = True) -> torch.Tensor:
    """``sum_b mean_j KL(p_T || p_S)``; student logits and teacher log-probabilities
    ``[B, A, V]`` (any float dtype, computed in fp32).

    ``teacher_logp`` is already at the temperature (e.g. the log of the teacher's averaged
    answer distribution, :func:`m2iv.train.teacher.mean_answer_log_probs`); the student's
    logits are divided by ``temperature`` here, and the result is scaled by
    ``temperature**2`` so gradient magnitudes do not depend on it. ``reduce=False`` returns
    the per-query values ``[B]``.
    """
    t = temperature
    s_logp = torch.log_softmax(student_logits.float() / t, -1)
    t_logp = teacher_logp.float()
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1) * (t * t)  # [B, A]
    per_q = per_query_mean(kl, mask)
    return per_q.sum() if reduce else per_q


def answer_ce(student_logits: torch.Tensor, answer_ids: torch.Tensor, mask: torch.Tensor,
              reduce: bool = True) -> torch.Tensor:
    """``sum_b mean_j -log p_S(answer_j)``; ``answer_ids`` ``[B, A]`` (-100 where padded)."""
    logp = torch.log_softmax(student_logits.float(), -1)
    ids = answer_ids.clamp_min(0)
    nll = -logp.gather(-1, ids[..., None]).squeeze(-1)  # [B, A]
    per_q = per_query_mean(nll, mask)
    return per_q.sum() if reduce else per_q


def hidden_alignment(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                     mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``sum_b mean_{l, j} ||h_S - h_T||^2 / ||h_T||^2`` with hidden states ``[B, L, A, D]``.

    Relative, so every layer counts the same however large its residual stream is.
    """
    s, t = student_hidden.float(), teacher_hidden.float()
    err = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(eps)  # [B, L, A]
    return per_query_mean(err.mean(1), mask).sum()


def branch_decorrelation(mha: torch.Tensor, mha_gates: torch.Tensor, mlp: torch.Tensor,
                         mlp_gates: torch.Tensor, o_proj_weights: list[torch.Tensor],
                         eps: float = 1e-12) -> torch.Tensor:
    """``mean_l cos^2(W_o,l (alpha_l * a_l), beta_l * b_l)`` for one vector set.

    ``mha [L, H, Dh]``, ``mha_gates [L, H]``, ``mlp [L, D]``, ``mlp_gates [L]``;
    ``o_proj_weights[l]`` is layer ``l``'s ``[D, H*Dh]`` o_proj weight (treated as constant).
    Zero when either branch is zero.
    """
    terms = []
    for i, w in enumerate(o_proj_weights):
        heads = (mha_gates[i, :, None].float() * mha[i].float()).flatten()
        c = w.detach().float().to(heads.device) @ heads
        m = mlp_gates[i].float() * mlp[i].float()
        dot = (c * m).sum()
        terms.append(dot * dot / (c.pow(2).sum() * m.pow(2).sum() + eps))
    return torch.stack(terms).mean()
