"""How much the ODE state dtype moves RDM scores at the official solver settings (fehlberg2, rtol = atol = 1e-5,
one Rademacher probe per sample): ``likelihood.state_dtype: float64`` (the package default: the log-density change
accumulates in float64) against ``float32`` (the official RDM code's path). Not a speed benchmark: it prints the
per-sample difference of the log-likelihood in nats per dimension and the solver's function evaluations.

    OMP_NUM_THREADS=1 python benchmarks/ood_state_dtype.py [--dim 32] [--steps 600] [--samples 256]
    OMP_NUM_THREADS=1 python benchmarks/ood_state_dtype.py --rdm RUN/rdm/cnn__raw/rdm.pt \
        --features FEATURES/cnn/id_test.pt [--samples 256]      # an RDM of the pipeline on its cached features

Without ``--rdm``, a small RDM (width 128, 3 blocks) is trained on a correlated two-component Gaussian mixture in
``dim`` dimensions and scores ``samples`` ID samples and as many shifted ones. With ``--rdm``, a fitted RDM of the
pipeline scores the first ``samples`` rows of a cached feature file (through its preprocessing). Either way the score
network runs in float32 both times and the probes are the same: only the ODE state (and so the adaptive steps)
differs.
"""

from __future__ import annotations

import argparse
import platform
from functools import partial

import torch

from lightning_methods.ood.rdm import RDMModule


def mixture(n: int, dim: int, generator: torch.Generator, shift: float = 0.0) -> torch.Tensor:
    mix = torch.randn(dim, dim, generator=generator) / dim**0.5
    centres = torch.stack([torch.full((dim,), 1.5), torch.full((dim,), -1.5)])
    pick = torch.randint(0, 2, (n,), generator=generator)
    return centres[pick] + torch.randn(n, dim, generator=generator) @ (torch.eye(dim) + mix) * 0.7 + shift


def main(args: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--random_output", type=float, default=0.0,
                        help="after training, add N(0, s^2) noise to every weight (a rougher flow)")
    parser.add_argument("--rdm", help="rdm.pt of a pipeline run (with --features)")
    parser.add_argument("--features", help="a cached feature file of the pipeline")
    ns = parser.parse_args(args)
    if ns.rdm:
        from lightning_methods.ood.cache import load_verified
        from lightning_methods.ood.stages import load_rdm

        model, pre = load_rdm(ns.rdm)
        feats = load_verified(ns.features, "feature file")
        test = pre(feats["features"][: ns.samples])
        return compare(model, test, f"{ns.rdm} on {len(test)} rows of {ns.features}")
    gen = torch.Generator().manual_seed(0)
    train = mixture(4096, ns.dim, gen)
    mean, std = train.mean(0), train.std(0)
    torch.manual_seed(0)
    model = RDMModule(dim=ns.dim, net={"width": 128, "bottleneck": 128, "num_blocks": 3, "time_embed_dim": 64},
                      optimizer=partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.0))
    opt = model.configure_optimizers()["optimizer"]
    batch_gen = torch.Generator().manual_seed(1)
    for _ in range(ns.steps):
        x = (train[torch.randint(0, len(train), (256,), generator=batch_gen)] - mean) / std
        loss = model.loss({"feature": x}, batch_gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    if ns.random_output:
        with torch.no_grad():
            for p in model.net.parameters():
                p.add_(torch.randn(p.shape, generator=batch_gen) * ns.random_output)
    test = torch.cat([mixture(ns.samples, ns.dim, gen), mixture(ns.samples, ns.dim, gen, shift=1.0)])
    test = (test - mean) / std
    return compare(model, test, f"{len(test)} mixture samples (half shifted), {ns.steps} training steps, "
                   f"weight noise {ns.random_output}")


def compare(model: RDMModule, test: torch.Tensor, what: str) -> dict[str, float]:
    """Score ``test`` with a float32 and a float64 ODE state (fehlberg2, rtol = atol = 1e-5, one probe)."""
    model.likelihood_settings.method, model.likelihood_settings.trace = "fehlberg2", "hutchinson"
    model.likelihood_settings.rtol = model.likelihood_settings.atol = 1e-5
    model.likelihood_settings.n_probes = 1
    dim = test.shape[1]
    index = torch.arange(len(test))
    out = {}
    for dtype in ("float32", "float64"):
        model.likelihood_settings.state_dtype = dtype
        out[dtype] = torch.cat([model.log_likelihood(test[i:i + 128], index[i:i + 128])
                                for i in range(0, len(test), 128)])
    diff = (out["float64"] - out["float32"]).abs() / dim
    result = {"max_nats_per_dim": float(diff.max()), "mean_nats_per_dim": float(diff.mean()),
              "median_nats_per_dim": float(diff.median()),
              "mean_abs_nll_per_dim": float((out["float64"].abs() / dim).mean())}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"dim {dim}, {what}; fehlberg2 rtol = atol = 1e-5, one Rademacher probe")
    print("|logp(float64 state) - logp(float32 state)| / dim: max {max_nats_per_dim:.2e}, mean "
          "{mean_nats_per_dim:.2e}, median {median_nats_per_dim:.2e} nats/dim (|NLL| / dim averages "
          "{mean_abs_nll_per_dim:.3f})".format(**result))
    return result


if __name__ == "__main__":
    main()
