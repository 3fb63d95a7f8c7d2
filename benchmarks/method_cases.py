"""Per-step cost of each optimizer and method module against a plain-SGD baseline on the same model.

Two sections, each with its own baseline (the first case):
- ``optimizers``: ImageClassifier on the section backbone with every optimizer of the package.
- ``distillation``: a student trained with CE only vs KD / DKD / DeepKD with the teacher forward included
  (resnet32x4 -> resnet8x4 in full mode, as in the papers).

A new method adds its case to one of the lists below.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from lightning_methods import create_backbone
from lightning_methods.callbacks import SSAMMaskCallback
from lightning_methods.distillation import distiller_class
from lightning_methods.optim import ASAMON, KOALAM, KOALAV, SAM, SAMON, SSAM, DeepKD, KOALAPlusPlus

from harness import Settings, classifier, data, time_trainer

Case = tuple[str, Callable[[], float]]
SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)


def optimizer_cases(s: Settings) -> list[Case]:
    def case(make_opt: Callable, callbacks: Callable[[], list] | None = None) -> Callable[[], float]:
        return lambda: time_trainer(s, classifier(s.backbone, optimizer=make_opt), data(s, gpu_resident=True),
                                    callbacks=callbacks() if callbacks else None)

    fisher = 16 if s.device == "cpu" else 128
    return [
        ("SGD (baseline)", case(SGD)),
        ("AdamW", case(partial(torch.optim.AdamW, lr=1e-3, weight_decay=5e-4))),
        ("SAM (rho 0.2)", case(partial(SAM, base_optimizer=SGD, rho=0.2))),
        ("SAM-ON (rho 1.0)", case(partial(SAMON, base_optimizer=SGD, rho=1.0))),
        ("SAM-ON + ascent-pass saving", case(partial(SAMON, base_optimizer=SGD, rho=1.0, freeze_non_norm_pass1=True))),
        ("ASAM-ON elementwise (rho 10)", case(partial(ASAMON, base_optimizer=SGD, rho=10.0, adaptive="elementwise"))),
        ("SAM every 2nd step", case(partial(SAM, base_optimizer=SGD, rho=0.2, sam_every_k=2))),
        ("SSAM-F (s 0.5; mask refresh at batch 0, untimed)",
         case(partial(SSAM, base_optimizer=SGD, rho=0.2, sparsity=0.5),
              lambda: [SSAMMaskCallback(mode="fisher", num_samples=fisher)])),
        ("SSAM-D (s 0.5)", case(partial(SSAM, base_optimizer=SGD, rho=0.2, sparsity=0.5, mask_init="random"),
                                lambda: [SSAMMaskCallback(mode="dynamic", t_end=200)])),
        ("KOALA-V", case(partial(KOALAV, lr=1.0, sigma=0.1, weight_decay=5e-4))),
        ("KOALA-M", case(partial(KOALAM, lr=1.0, weight_decay=5e-4))),
        ("KOALA++", case(partial(KOALAPlusPlus, lr=1.0, sigma=0.1, q=0.1, weight_decay=5e-4))),
    ]


def distillation_cases(s: Settings) -> list[Case]:
    student, teacher = ("resnet8", "resnet14") if s.device == "cpu" else ("resnet8x4", "resnet32x4")
    opt = partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def kd(method: str, deepkd: bool = False, streams: str = "batched") -> Callable[[], float]:
        def run() -> float:
            streams_arg = {"deepkd_streams": streams} if deepkd else {}
            model = distiller_class(method, deepkd)(
                backbone=student, teacher=create_backbone(teacher, 100),
                optimizer=partial(DeepKD, lr=0.05) if deepkd else opt, log_teacher_accuracy=False, **streams_arg)
            return time_trainer(s, model, data(s, gpu_resident=True))
        return run

    return [
        (f"{student}, CE only (baseline)",
         lambda: time_trainer(s, classifier(student, optimizer=opt), data(s, gpu_resident=True))),
        (f"KD ({teacher} teacher)", kd("kd")),
        ("DKD", kd("dkd")),
        ("KD + DeepKD (3 streams, one batched backward)", kd("kd", deepkd=True)),
        ("KD + DeepKD (3 sequential backward passes)", kd("kd", deepkd=True, streams="sequential")),
        ("DKD + DeepKD (batched)", kd("dkd", deepkd=True)),
        ("DKD + DeepKD (sequential)", kd("dkd", deepkd=True, streams="sequential")),
    ]


def official_style_sam_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                            rho: float = 0.05) -> None:
    """The two-step SAM of the reference implementation (davda54/sam), written out: ascent by
    rho * g / ||g||, second forward-backward at the perturbed point, restore, base step. Written for this benchmark
    (not copied); BatchNorm statistics update in both passes, as in the reference's README loop."""
    params = [p for g in opt.param_groups for p in g["params"]]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        scale = rho / (torch.norm(torch.stack([g.norm(2) for g in grads]), 2) + 1e-12)
        eps = [p.grad * scale if p.grad is not None else None for p in params]
        for p, e in zip(params, eps):
            if e is not None:
                p.add_(e)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            if e is not None:
                p.sub_(e)
    opt.step()
    opt.zero_grad(set_to_none=True)


def gpu_method_cases(s: Settings) -> list[Case]:
    """The GPU section's method rows: SGD, the package's SAM and the official-style SAM step in the same raw loop
    (no Lightning, same model and batch), then DeepKD with its three streams batched vs sequential."""
    import time

    from lightning_methods.optim import sam_closure
    from lightning_methods.parameters import param_groups_by_role

    from harness import sync

    device = torch.device(s.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (s.batch_size,), generator=g).to(device)
    autocast = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                       enabled=s.precision == "bf16-mixed")

    def raw(kind: str) -> Callable[[], float]:
        torch.manual_seed(0)
        model = create_backbone(s.backbone, 100).to(device).train()
        opt = (SAM(param_groups_by_role(model), SGD, rho=0.05) if kind == "package" else
               SGD(param_groups_by_role(model)))

        def step() -> None:
            with autocast():
                if kind == "sgd":
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                elif kind == "package":
                    opt.step(sam_closure(model, lambda: torch.nn.functional.cross_entropy(model(x), y)))
                else:
                    official_style_sam_step(model, opt, x, y)

        def run() -> float:
            for _ in range(s.warmup):
                step()
            sync(s.device)
            t0 = time.perf_counter()
            for _ in range(s.steps):
                step()
            sync(s.device)
            return (time.perf_counter() - t0) / s.steps
        return run

    deepkd = {name: fn for name, fn in distillation_cases(s) if "DeepKD" in name and name.startswith("KD")}
    return [("raw loop, SGD (baseline)", raw("sgd")), ("raw loop, lightning_methods SAM (rho 0.05)", raw("package")),
            ("raw loop, official-style SAM step (rho 0.05)", raw("official")), *deepkd.items()]
