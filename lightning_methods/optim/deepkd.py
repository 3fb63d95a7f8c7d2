"""DeepKD's three-momentum SGD.

Huang, Song, Zhang, Ren. *DeepKD: A Deeply Decoupled and Denoised Knowledge Distillation Trainer*. NeurIPS 2025,
arXiv 2505.15133; official code haiduo/DeepKD (``mdistiller/engine/deepkd.py``). It extends DOT (Zhao et al.,
ICCV 2023), which separated the task and KD momenta.

The task gradient (TOG, from CE), the target-class gradient (TCG, from TCKD) and the non-target-class gradient (NCG,
from NCKD) each get their own momentum buffer (paper, Eq. 7; no dampening, no Nesterov)::

    v_s <- g_s + m_s v_s        for s in (tog, tcg, ncg), m_s = momentum + delta_s
    theta <- theta - lr (v_tog + v_tcg + v_ncg)

Each buffer starts at its first gradient (PyTorch SGD convention). Weight decay ``lambda * theta`` (with theta before
the step) is added once, to one stream's gradient: ``weight_decay_stream="tcg"`` as in the official code (the paper
does not say where it goes). ``replicate_official_momentum_quirk=True`` reproduces the official code's TOG update,
which decays the TOG buffer with ``m_tcg`` instead of ``m_tog`` whenever the parameter also received a TCG gradient
(always, for a student), so that the effective TOG momentum is ``m_tcg`` (0.825 by default, DOT's "task momentum");
without a TCG gradient it uses ``m_ncg``, without either the mean of the three momenta.
Not replicated: the official code evaluates the TCG weight decay on the parameter after the TOG and NCG updates of
the same step (a difference of order ``lr * lambda``).

Usage (without Lightning)::

    opt = DeepKD(student.parameters(), lr=0.05)
    g_ncg = torch.autograd.grad(loss_nckd, params, retain_graph=True)
    g_tcg = torch.autograd.grad(loss_tckd, params, retain_graph=True)
    g_tog = torch.autograd.grad(loss_ce, params)
    opt.step(grads=(g_tog, g_tcg, g_ncg))

``grads`` holds one sequence per stream, aligned with the parameters of all groups in order (``None`` entries skip
that stream for that parameter, as SGD skips parameters without gradient). The state of every parameter holds
``momentum_buffer`` (TOG), ``momentum_tcg_buffer`` and ``momentum_ncg_buffer`` (the official key names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch.optim import Optimizer

STREAMS = ("tog", "tcg", "ncg")
STATE_KEYS = {"tog": "momentum_buffer", "tcg": "momentum_tcg_buffer", "ncg": "momentum_ncg_buffer"}
GradList = Sequence[torch.Tensor | None]


class DeepKD(Optimizer):
    """SGD with three momentum buffers (TOG, TCG, NCG).

    Args:
        params: parameters or parameter groups (role-tagged groups from ImageClassifier work).
        lr: learning rate.
        momentum: base momentum mu (0.9).
        delta_tog: offset of the TOG momentum (+0.075 -> 0.975).
        delta_tcg: offset of the TCG momentum (-0.075 -> 0.825).
        delta_ncg: offset of the NCG momentum (+0.075 -> 0.975; per teacher/student pair in the official configs).
        weight_decay: L2 coefficient lambda, added once per step to the gradient of ``weight_decay_stream``.
        weight_decay_stream: the stream that carries the weight decay ("tcg" in the official code).
        replicate_official_momentum_quirk: decay the TOG buffer with the TCG momentum when the parameter also has a
            TCG gradient, as the official implementation does (default: the paper rule).
    """

    supports_grad_scaler = False  # three gradient streams from autograd.grad: a GradScaler cannot unscale them

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.05,
        momentum: float = 0.9,
        delta_tog: float = 0.075,
        delta_tcg: float = -0.075,
        delta_ncg: float = 0.075,
        weight_decay: float = 5e-4,
        weight_decay_stream: Literal["tog", "tcg", "ncg"] = "tcg",
        replicate_official_momentum_quirk: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        for name, delta in (("tog", delta_tog), ("tcg", delta_tcg), ("ncg", delta_ncg)):
            if not 0.0 <= momentum + delta < 1.0:
                raise ValueError(f"momentum + delta_{name} = {momentum + delta} must lie in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if weight_decay_stream not in STREAMS:
            raise ValueError(f"weight_decay_stream must be one of {STREAMS}, got {weight_decay_stream!r}")
        defaults = dict(lr=lr, momentum=momentum, delta_tog=delta_tog, delta_tcg=delta_tcg, delta_ncg=delta_ncg,
                        weight_decay=weight_decay, weight_decay_stream=weight_decay_stream,
                        replicate_official_momentum_quirk=replicate_official_momentum_quirk)
        super().__init__(params, defaults)

    @staticmethod
    def momenta(group: dict[str, Any]) -> dict[str, float]:
        """The three momentum coefficients of a parameter group."""
        return {s: group["momentum"] + group[f"delta_{s}"] for s in STREAMS}

    def ordered_params(self) -> list[torch.Tensor]:
        """All parameters of all groups, in the order ``grads`` must follow."""
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None,
             grads: tuple[GradList, GradList, GradList] | None = None) -> Any:
        """Update with the three gradient streams ``grads = (g_tog, g_tcg, g_ncg)``.

        ``closure`` (if given) is evaluated first under ``enable_grad`` and its value returned; Lightning passes one
        that runs its precision and ``on_before_optimizer_step`` hooks.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grads is None:
            raise TypeError(
                "DeepKD.step needs the three gradient streams: step(grads=(g_tog, g_tcg, g_ncg)), each a sequence "
                "aligned with optimizer.ordered_params() (e.g. from torch.autograd.grad). It does not read p.grad."
            )
        if len(grads) != 3:
            raise ValueError(f"grads must be (g_tog, g_tcg, g_ncg), got {len(grads)} sequences")
        params = self.ordered_params()
        for name, g in zip(STREAMS, grads):
            if len(g) != len(params):
                raise ValueError(f"grads for {name} has {len(g)} entries, the optimizer has {len(params)} parameters")
        offset = 0
        for group in self.param_groups:
            n = len(group["params"])
            self._step_group(group, [g[offset:offset + n] for g in grads])
            offset += n
        return loss

    def _step_group(self, group: dict[str, Any], grads: list[GradList]) -> None:
        m = self.momenta(group)
        lr, wd, wd_stream = group["lr"], group["weight_decay"], group["weight_decay_stream"]
        quirk = group["replicate_official_momentum_quirk"]
        params = group["params"]
        updates: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # applied after every buffer is updated
        for stream, stream_grads in zip(STREAMS, grads):
            key = STATE_KEYS[stream]
            idx = [i for i, g in enumerate(stream_grads) if g is not None]
            if not idx:
                continue
            ps = [params[i] for i in idx]
            gs = [stream_grads[i] for i in idx]
            if stream == wd_stream and wd != 0:
                gs = torch._foreach_add(gs, ps, alpha=wd)  # theta before the step
            by_momentum: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            bufs = []
            for i, p, g in zip(idx, ps, gs):
                state = self.state[p]
                buf = state.get(key)
                if buf is None:  # the first gradient initializes the buffer
                    buf = state[key] = g.detach().clone()
                else:
                    mom = m[stream]
                    if quirk and stream == "tog":  # official code: the TOG buffer borrows another momentum
                        if grads[1][i] is not None:
                            mom = m["tcg"]
                        elif grads[2][i] is not None:
                            mom = m["ncg"]
                        else:
                            mom = (m["tog"] + m["tcg"] + m["ncg"]) / 3.0
                    pair = by_momentum.setdefault(mom, ([], []))
                    pair[0].append(buf)
                    pair[1].append(g)
                bufs.append(buf)
            for mom, (old, new) in by_momentum.items():
                torch._foreach_mul_(old, mom)
                torch._foreach_add_(old, new)
            updates.append((ps, bufs))
        for ps, bufs in updates:  # one call per stream: no parameter appears twice in a call
            torch._foreach_add_(ps, bufs, alpha=-lr)
