"""Generator training step time, fp32 vs bf16 side by side in one run, at the real default shapes.

    python benchmarks/bench_generator_training.py                 # DnD and CVAE, 8 timed steps each
    python benchmarks/bench_generator_training.py --arch dnd --steps 20

The LoRA layout is the default harvest's (SmolLM2-135M-Instruct, r=8, seven projections), built
from the base model's config alone (no harvest needed); conditions and targets are random tensors of
the training shapes (DnD: (B, N, L, C) prompt states -> (B, T, h, w) tokens; CVAE: (B, D) weights and
(B, H) task vectors), because the step's cost does not depend on their values. Each step is one
AdamW update through ``generator.training.run_steps`` (the loop ``registry train-generator`` uses),
so the forward runs under the precision's autocast with fp32 parameters. Rows alternate between the
precisions (``--rounds``) so machine load hits both alike; the median step time of each is printed
with wall and CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit_summary  # noqa: E402


def default_layout(base: str | None, rank: int):
    """The LoRA layout of a default harvest on ``base`` (zero weights of the right shapes)."""
    import torch

    from generator.tokenizer import layout_from_state_dict
    from harvest.train import DEFAULT_TARGETS
    from registry import base_models

    shapes = base_models.linear_module_shapes(base_models.load_base_config(base))  # path -> (out, in)
    state = {}
    for path, (out_features, in_features) in shapes.items():
        if path.rsplit(".", 1)[-1] in DEFAULT_TARGETS:
            prefix = f"base_model.model.{path}"
            state[f"{prefix}.lora_A.weight"] = torch.zeros(rank, in_features)
            state[f"{prefix}.lora_B.weight"] = torch.zeros(out_features, rank)
    return layout_from_state_dict(state)


def dnd_case(layout, batch_size: int, n_prompts: int):
    import torch

    from generator.dnd import DnDConfig, DnDDecoder
    from generator.training import weighted_mse

    config = DnDConfig.from_layout(layout, n_prompts=n_prompts, embed_dim=384)
    model = DnDDecoder(config)
    condition = torch.randn(batch_size, *config.input_shape)  # (B, N, L, C)
    target = torch.randn(batch_size, *config.output_shape)    # (B, T, h, w)
    weights = torch.ones(config.output_shape)                 # (T, h, w)
    return model, lambda: weighted_mse(model(condition).float(), target, weights), f"DnD {config.input_shape} -> {config.output_shape}"


def cvae_case(layout, batch_size: int):
    import torch

    from generator.cvae import CVAEConfig, LoraCVAE, cvae_loss

    config = CVAEConfig.from_layout(layout, cond_dim=576, basis_dim=15)
    model = LoraCVAE(config)
    weights = torch.randn(batch_size, config.input_dim)  # (B, D)
    cond = torch.randn(batch_size, 576)                   # (B, H)
    model.fit_condition(cond)
    model.fit_basis(torch.randn(16, config.input_dim))

    def loss():
        recon, mu, logvar = model(weights, cond, torch.randn(batch_size, config.latent_dim))
        return cvae_loss(recon.float(), weights, mu.float(), logvar.float(), 1e-3)[0]

    return model, loss, f"CVAE D={config.input_dim} K=15"


def time_steps(model, loss, precision: str, steps: int) -> dict:
    import torch

    from generator.training import TrainState, run_steps

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wall, cpu = [], []
    marks = [(time.perf_counter(), time.process_time())]

    def on_step(step, total, value):
        marks.append((time.perf_counter(), time.process_time()))

    run_steps(model, optimizer, TrainState(), steps + 1, torch.Generator(), loss, 1.0, on_step, precision=precision)
    for (w0, c0), (w1, c1) in list(zip(marks, marks[1:]))[1:]:  # the first step warms up
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="dnd,cvae", help="comma-separated: dnd, cvae")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per precision and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 for DnD, 4 for the CVAE")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--base", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from harvest.train import configure_threads

    threads = configure_threads(args.threads)
    layout = default_layout(args.base, rank=8)
    summary = {}
    for arch in [a for a in args.arch.split(",") if a]:
        if arch == "dnd":
            model, loss, label = dnd_case(layout, args.batch_size or 8, args.n_prompts)
        elif arch == "cvae":
            model, loss, label = cvae_case(layout, args.batch_size or 4)
        else:
            parser.error(f"unknown arch {arch!r}")
        runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            for precision in runs:
                runs[precision].append(time_steps(model, loss, precision, args.steps))
        row = {p: {k: round(min(r[k] for r in rs), 4) for k in ("wall_s", "cpu_s")} for p, rs in runs.items()}
        row["speedup_wall"] = round(row["fp32"]["wall_s"] / row["bf16"]["wall_s"], 2)
        row["speedup_cpu"] = round(row["fp32"]["cpu_s"] / row["bf16"]["cpu_s"], 2)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        summary[arch] = row
        print(f"{label} ({row['parameters'] / 1e6:.1f} M params, threads={threads}): step fp32 "
              f"{row['fp32']['wall_s']:.3f} s (cpu {row['fp32']['cpu_s']:.3f}), bf16 {row['bf16']['wall_s']:.3f} s "
              f"(cpu {row['bf16']['cpu_s']:.3f}): x{row['speedup_wall']} wall, x{row['speedup_cpu']} cpu", flush=True)
    emit_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
