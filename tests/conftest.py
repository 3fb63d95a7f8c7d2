import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, also in spawned DDP workers

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")

from helpers import write_fake_cifar  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """A ``gpu``-marked test skips itself where there is no CUDA device (``pytest -m gpu`` on a CPU machine)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one test process per CPU this process may run on (the CI machine's 2), not
    per physical core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_configure(config):
    """Under pytest-xdist, split the CPUs between the test processes: torch's default of one intra-op thread per core
    in each of them would oversubscribe the machine (each test's tiny model then waits on the other's threads)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        cpus = pytest_xdist_auto_num_workers(config)
        torch.set_num_threads(max(1, cpus // int(workers)))


_WORKER_SWAPS = pytest.StashKey[list]()  # the xdist workers' swaps, gathered by the controlling process


def _config_swaps() -> list[str]:
    overrides = sys.modules.get("config_overrides")
    return list(getattr(overrides, "SWAPS", None) or [])


def pytest_sessionfinish(session, exitstatus):
    """An xdist worker hands its config swaps to the controlling process, which prints the summary."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["config_swaps"] = _config_swaps()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controlling process (pytest-xdist) collects each worker's config swaps."""
    node.config.stash.setdefault(_WORKER_SWAPS, []).extend(getattr(node, "workeroutput", {}).get("config_swaps", []))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say which shipped configs the config smoke test ran with something swapped for speed."""
    swaps = _config_swaps() + config.stash.get(_WORKER_SWAPS, [])
    if swaps:
        terminalreporter.section("config smoke test: swapped for speed")
        terminalreporter.write_line("every config: fast_dev_run, batch_size 4 unless listed, 32-true on CPU")
        for line in sorted(set(swaps)):
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def fake_cifar_root(tmp_path_factory):
    """A data_dir holding small fake CIFAR-10 and CIFAR-100 releases in the official pickle format."""
    root = tmp_path_factory.mktemp("cifar")
    arrays = {"cifar100": write_fake_cifar(root, "cifar100", n_train=200, n_test=100, seed=1),
              "cifar10": write_fake_cifar(root, "cifar10", n_train=100, n_test=50, seed=2)}
    return root, arrays


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: as fast, and immune to oversubscription on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_leftover_seed(monkeypatch):
    """Lightning's seed_everything leaves PL_GLOBAL_SEED / PL_SEED_WORKERS in os.environ; DDP set-up re-seeds from
    them and DataLoader workers read them, so a test's result (and its run_ddp workers') would depend on which test ran
    before it. Every test starts without them."""
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_where_pytest_runs():
    """Tests write into their own tmp_path: an entry a test leaves in the folder pytest runs in (the repository, for
    the README's command), e.g. the W&B folder of a config's relative ``save_dir``, fails the session, naming it."""
    cwd = Path.cwd()
    before = {path.name for path in cwd.iterdir()}
    yield
    left = sorted({path.name for path in cwd.iterdir()} - before)
    assert not left, f"the tests left {left} in {cwd}: a test wrote outside its tmp_path (monkeypatch.chdir(tmp_path))"


@pytest.fixture(autouse=True)
def _wandb_isolation(tmp_path, monkeypatch):
    """Each test gets its own W&B directory, and no W&B run outlives the test that opened it (a WandbLogger would
    otherwise reuse it in a later test)."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
