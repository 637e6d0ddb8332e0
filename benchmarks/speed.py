"""Speed: ms per gradient update of each algorithm, EDIS's denoiser (fp32 and bf16), env steps per second.

    python benchmarks/speed.py                      # CPU, batch 256, Hopper sizes
    python benchmarks/speed.py --device cuda --updates 2000
    python benchmarks/speed.py --denoisers 256x3 1024x6 --algorithms --envs

Updates run on random transitions with the sizes of the chosen env (the cost of an update does
not depend on the data); the default configs of each file are used (Cal-QL: 10 sampled actions,
2 hidden critic layers). Each number is the median of --repeats timed blocks, after a warm-up.
"""

import argparse
import importlib.util
import statistics
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AGENTS = {"iql": "ImplicitQLearning", "calql": "CalQL"}


def time_updates(name: str, env_id: str, device: torch.device, batch_size: int, updates: int, repeats: int) -> float:
    """Median milliseconds per update."""
    module = load(name)
    env = module.make_env(module.DatasetInfo("speed", env_id, module.domain_of(env_id)))
    state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    config = module.TrainConfig(batch_size=batch_size, device=str(device))
    agent = getattr(module, AGENTS[name])(config, state_dim, action_dim, 1.0, device)
    columns = {"states": state_dim, "actions": action_dim, "rewards": 1, "next_states": state_dim, "dones": 1}
    if name == "calql":
        columns["mc_returns"] = 1
    buffer = module.ReplayBuffer(10_000, columns, device)
    rng = np.random.default_rng(0)
    buffer.add_batch(**{key: rng.uniform(-1, 1, (10_000, width)).astype(np.float32) for key, width in columns.items()})
    for _ in range(20):
        agent.update(buffer.sample(batch_size))
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(updates):
            agent.update(buffer.sample(batch_size))
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append((time.perf_counter() - start) / updates * 1000)
    return statistics.median(timings)


def time_denoiser(size: str, bf16: bool, env_id: str, device: torch.device, batch_size: int, updates: int,
                  repeats: int) -> tuple:
    """(ms per denoiser training step at batch_size, microseconds per sample per denoiser call at batch 1000)."""
    module = load("iql_edis")
    width, blocks = (int(part) for part in size.split("x"))
    env = module.make_env(module.DatasetInfo("speed", env_id, module.domain_of(env_id)))
    layout = module.TransitionLayout(env.observation_space.shape[0], env.action_space.shape[0], False)
    config = module.EDISConfig(width=width, blocks=blocks, bf16=bf16, batch_size=batch_size)
    diffusion = module.TransitionDiffusion(layout.dim, config, device)
    data = torch.randn(10_000, layout.dim, device=device)
    diffusion.fit(data, 5)
    train_ms, sample_us = [], []
    x, sigma = torch.randn(1000, layout.dim, device=device), torch.full((1000,), 0.5, device=device)
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        diffusion.fit(data, updates)
        synchronize(device)
        train_ms.append((time.perf_counter() - start) / updates * 1000)
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(10):
                diffusion.denoise(x, sigma)
            synchronize(device)
        sample_us.append((time.perf_counter() - start) / 10 / 1000 * 1e6)
    return statistics.median(train_ms), statistics.median(sample_us)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def env_steps_per_second(env_id: str, steps: int = 5000) -> float:
    module = load("iql")
    env = module.make_env(module.DatasetInfo("speed", env_id, module.domain_of(env_id)), seed=0)
    env.reset(seed=0)
    env.action_space.seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="*", default=list(AGENTS), help="agents to time (empty: none)")
    parser.add_argument("--env", default="Hopper-v5", help="env whose observation/action sizes are used")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--updates", type=int, default=200, help="updates per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--denoisers", nargs="*", default=["256x3"],
                        help="EDIS denoiser sizes WIDTHxBLOCKS (empty: none)")
    parser.add_argument("--envs", nargs="*", default=["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5"],
                        help="envs whose step rate is measured (empty: none)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.env} sizes\n")
    if args.algorithms:
        print("| algorithm | ms / update | s / 1000 updates |\n|---|---|---|")
    for name in args.algorithms:
        ms = time_updates(name, args.env, device, args.batch_size, args.updates, args.repeats)
        print(f"| {name} | {ms:.2f} | {ms:.2f} |", flush=True)
    if args.denoisers:
        print("\n| EDIS denoiser | precision | ms / training step | us / sample / denoiser call (batch 1000) |\n"
              "|---|---|---|---|")
    for size in args.denoisers:
        for bf16 in (False, True):
            train_ms, sample_us = time_denoiser(size, bf16, args.env, device, args.batch_size,
                                                max(args.updates // 4, 1), args.repeats)
            print(f"| {size} | {'bf16' if bf16 else 'fp32'} | {train_ms:.1f} | {sample_us:.1f} |", flush=True)
    if args.envs:
        print("\n| env | steps / s (random actions) |\n|---|---|")
        for env_id in args.envs:
            print(f"| {env_id} | {env_steps_per_second(env_id):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
