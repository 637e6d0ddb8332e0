"""No host-device synchronisation per update or per sampler step.

On a GPU, every read of a device value from the host (.item(), float(t), bool(t), .cpu(),
.numpy(), .tolist(), nonzero) waits for the queue to drain. There is no GPU here, so the test
patches those entry points and counts the calls that the algorithm files make: a count that grows
with the number of updates, sampler steps or energy epochs is a sync in the hot path.
"""

import sys
from contextlib import contextmanager
from typing import Iterator, List

import pytest
import torch

SYNC_METHODS = ("item", "__float__", "__int__", "__bool__", "cpu", "numpy", "tolist", "nonzero")


@contextmanager
def counted_syncs(module_file: str) -> Iterator[List[str]]:
    """Records each sync call made from `module_file` (calls made inside torch itself are not ours)."""
    calls: List[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name: str):
        original = originals[name]

        def counting(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename == module_file:
                calls.append(f"{name} at line {caller.f_lineno}")
            return original(self, *args, **kwargs)

        return counting

    for name in SYNC_METHODS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def batch_of(rows: int, state_dim: int = 5, action_dim: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"states": torch.randn(rows, state_dim, generator=generator),
            "actions": torch.rand(rows, action_dim, generator=generator) * 2 - 1,
            "rewards": torch.randn(rows, 1, generator=generator),
            "next_states": torch.randn(rows, state_dim, generator=generator),
            "dones": torch.zeros(rows, 1), "mc_returns": torch.randn(rows, 1, generator=generator)}


@pytest.mark.parametrize("name, agent_class", [("iql", "ImplicitQLearning"), ("calql", "CalQL"),
                                               ("iql_edis", "ImplicitQLearning"), ("calql_edis", "CalQL")])
def test_agent_updates_never_sync(name, agent_class, request):
    module = request.getfixturevalue(name)
    config = module.TrainConfig()
    agent = getattr(module, agent_class)(config, 5, 2, 1.0, torch.device("cpu"))
    batch = batch_of(64)
    with counted_syncs(module.__file__) as calls:
        for _ in range(5):
            agent.update(batch)
    assert calls == []


@pytest.mark.parametrize("name", ["iql_edis", "calql_edis"])
def test_refresh_syncs_do_not_grow_with_steps_epochs_or_samples(name, request):
    module = request.getfixturevalue(name)
    layout = module.TransitionLayout(3, 2, False)

    def syncs(steps: int, epochs: int, sample_steps: int) -> List[str]:
        config = module.EDISConfig(width=32, blocks=1, time_embedding_dim=8, sample_steps=sample_steps,
                                   sample_batch_size=64, negative_pool=32, transition_pool=20, energy_negatives=4,
                                   energy_hidden=16, energy_layers=1, batch_size=32, energy_batch_size=16)
        diffusion = module.TransitionDiffusion(layout.dim, config, torch.device("cpu"))
        energies = module.TransitionEnergies(layout, config, torch.device("cpu"))
        data = torch.randn(200, layout.dim)
        with counted_syncs(module.__file__) as calls:
            diffusion.fit(data, steps)
            with torch.no_grad():
                _, trajectory = diffusion.sample(32, record=True)
                _, conditioned = diffusion.sample(20, record=True, known=data[:20], known_mask=energies.masks["state"])
            energies.fit(data[:40], data[:40], trajectory, diffusion.guidance_levels(), epochs, data[:5],
                           conditioned)
            with torch.no_grad():
                diffusion.sample(64, guidance=energies.guidance)
        return calls

    few, many = syncs(steps=2, epochs=1, sample_steps=2), syncs(steps=12, epochs=4, sample_steps=8)
    assert many == few  # a constant, not one per step, epoch or sampler step
    assert len(few) <= 4  # the fit's last loss and each energy's


@pytest.mark.parametrize("name, agent_class", [("iql", "ImplicitQLearning"), ("calql", "CalQL"),
                                               ("iql_edis", "ImplicitQLearning"), ("calql_edis", "CalQL")])
def test_policies_build_distributions_without_argument_checks(name, agent_class, request, monkeypatch):
    """torch.distributions checks its arguments by default: a read of a device value (a sync) per distribution.
    The policies skip it; NaN is the finite guard's job."""
    module = request.getfixturevalue(name)
    agent = getattr(module, agent_class)(module.TrainConfig(), 5, 2, 1.0, torch.device("cpu"))
    checks: List[object] = []
    original = torch.distributions.Distribution.__init__

    def recording(self, *args, validate_args=None, **kwargs):
        checks.append(validate_args)
        original(self, *args, validate_args=validate_args, **kwargs)

    monkeypatch.setattr(torch.distributions.Distribution, "__init__", recording)
    agent.update(batch_of(64))
    agent.act(torch.zeros(3, 5).numpy(), explore=True)
    assert checks and all(check is False for check in checks), checks
