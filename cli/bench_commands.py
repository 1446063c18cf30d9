"""``registry bench`` (the full comparison) and ``registry demo`` (the README's main job)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import HomeOption, JsonOption, app, console, open_registry, print_json, progress

# The demo's small zoo: two members of each of two families (arithmetic, ja_arithmetic), and an
# unseen member of one of them, the case where a generator has neighbours to transfer from.
DEMO_TRAINING_TASKS = ("add_sub", "subtract_from", "ja_tasu", "ja_hiku")
DEMO_HELD_OUT = "plus_words"  # with ja_fullwidth_arith held out every method scored 0.00-0.02
DEMO_STEPS = 60
DEMO_KEEP = 3
DEMO_METHODS = ["base", "multitask", "selection", "mixture", "dnd", "sft"]


def _print_report(paths: dict[str, Path], json_output: bool) -> None:
    if json_output:
        print_json({k: str(v) for k, v in paths.items()})
        return
    from rich.markdown import Markdown

    out = console()
    out.print(Markdown(paths["markdown"].read_text(encoding="utf-8")))
    out.print(f"report: {paths['markdown']}  (JSON {paths['json']}, plots {paths['accuracy_plot']}, "
              f"{paths['time_plot']})")


def _run(reg, settings, out: Path):
    from evaluation.compare import run_bench

    with progress() as bar:
        task_id = bar.add_task("bench", total=None, status="")
        return run_bench(reg, settings, out,
                         on_status=lambda text: bar.update(task_id, status=text[:60]),
                         on_progress=lambda done, total: bar.update(task_id, completed=done, total=total))


@app.command()
def bench(
    held_out: Annotated[Optional[str], typer.Option("--held-out", help="Comma-separated held-out tasks (zoo names or .jsonl files): one custom split instead of the protocols.")] = None,
    protocols: Annotated[str, typer.Option("--protocols", help="Comma-separated protocols: variants (unseen members of seen families), families (whole families held out).")] = "variants,families",
    variants: Annotated[int, typer.Option("--variants", help="variants: families that lose one member to the held-out set.")] = 6,
    families: Annotated[int, typer.Option("--families", help="families: whole families held out.")] = 2,
    members: Annotated[int, typer.Option("--members", help="families: members of each held-out family evaluated.")] = 3,
    quick: Annotated[bool, typer.Option("--quick", help="Small run: 2 variants, 1 family of 2, 30 test items, short generator training.")] = False,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: all but training_mean): base,oracle,multitask,best_other,training_mean,selection,mixture,fusion,dnd,cvae,sft and the controls dnd_other,dnd_random,cvae_other,cvae_random,sft_other,sft_random.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Test items per task (default: all; 30 with --quick).")] = None,
    generator_steps: Annotated[Optional[int], typer.Option("--generator-steps", help="DnD training steps.")] = None,
    cvae_steps: Annotated[Optional[int], typer.Option("--cvae-steps", help="CVAE training steps.")] = None,
    sft_steps: Annotated[Optional[int], typer.Option("--sft-steps", help="Steps of the DnD decoder trained through the base (sft).")] = None,
    generator_seed: Annotated[Optional[int], typer.Option("--generator-seed", help="Seed of the generators' training only (default 0, the prompts' seed): a second seed reuses every other row.")] = None,
    cvae_objective: Annotated[str, typer.Option("--cvae-objective", help="recon (default) or sft: the CVAE trained --cvae-steps by reconstruction, then --sft-steps through the base with the SFT batches (train-generator --arch cvae --objective sft).")] = "recon",
    cvae_anchor: Annotated[str, typer.Option("--cvae-anchor", help="With --cvae-objective sft: none (default; the CVAE decodes the whole adapter) or multitask (it decodes a deviation added to the split's multitask LoRA; train-generator --anchor multitask).")] = "none",
    training_mean_max: Annotated[Optional[int], typer.Option("--training-mean-max", help="Training adapters averaged for training_mean (spread evenly).")] = None,
    best_other_max: Annotated[Optional[int], typer.Option("--best-other-max", help="Training adapters tried for best_other (family first, then nearest).")] = None,
    sft_anchor_k: Annotated[Optional[int], typer.Option("--sft-anchor-k", help="The SFT generator starts each adapter from the fusion of the k training adapters nearest to the prompts (train-generator --anchor retrieved) instead of the multitask LoRA.")] = None,
    sft_anchor_train: Annotated[Optional[str], typer.Option("--sft-anchor-train", help="With --sft-anchor-k: what a training task retrieves as its anchor, others (default; leave-one-out) or own (itself first, as at generation; train-generator --anchor-train).")] = None,
    sft_under_multitask: Annotated[bool, typer.Option("--sft-under-multitask", help="The SFT generator sits on the split's multitask LoRA: applied under it in training and stacked under every generated adapter (train-generator --under multitask).")] = False,
    sft_gate: Annotated[bool, typer.Option("--sft-gate", help="With --sft-under-multitask: generate with the entropy gate (generate --gate): the multitask LoRA alone unless the generated adapter lowers the first-token entropy on the task's prompts.")] = False,
    sft_contrast: Annotated[Optional[float], typer.Option("--sft-contrast", help="Weight of the SFT generator's condition-sensitivity hinge (train-generator --contrast-weight; default 0).")] = None,
    sft_head: Annotated[Optional[str], typer.Option("--sft-head", help="The SFT generator's head: residual (default), gated or routed (train-generator --head).")] = None,
    sft_tasks_per_step: Annotated[Optional[int], typer.Option("--sft-tasks-per-step", help="Tasks drawn per SFT step, each with its own generated LoRA (train-generator --batch-size; default 2).")] = None,
    sft_items_per_task: Annotated[Optional[int], typer.Option("--sft-items-per-task", help="Train items per drawn task per SFT step (train-generator --items-per-task; default 4).")] = None,
    multitask_steps: Annotated[Optional[int], typer.Option("--multitask-steps", help="Steps of the multitask LoRA (default: one harvest's, from the training tasks' recipe).")] = None,
    min_gain: Annotated[float, typer.Option("--min-gain", help="Hold out only tasks whose own stored harvest beats the base by this much (benchmarks/zoo_report.py stores the evaluations).")] = 0.15,
    n_prompts: Annotated[int, typer.Option("--n-prompts", help="Train prompts given to the generators and used as the retrieval query.")] = 32,
    k: Annotated[int, typer.Option("-k", help="Adapters retrieved and composed per task.")] = 3,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated bench tasks, zoo names or .jsonl files (default: every finished zoo harvest); pins a rerun to the same zoo.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Report folder (rows are cached here; rerun to resume).")] = Path("reports/bench"),
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Compare base, oracle, multitask, best other LoRA, retrieval+composition and both generators (with
    controls) on held-out tasks, per protocol."""
    from evaluation.compare import DEFAULT_METHODS, BenchSettings
    from registry.errors import RegistryError

    settings = BenchSettings(held_out=held_out.split(",") if held_out else None,
                             protocols=[p.strip() for p in protocols.split(",") if p.strip()],
                             variants=variants, families=families, members_per_family=members,
                             methods=methods.split(",") if methods else list(DEFAULT_METHODS), k=k,
                             tasks=tasks.split(",") if tasks else None, n_prompts=n_prompts, min_gain=min_gain)
    if quick:
        settings.variants, settings.families, settings.members_per_family = 2, 1, 2
        settings.limit, settings.generator_steps, settings.cvae_steps, settings.sft_steps = 30, 150, 50, 100
        settings.training_mean_max, settings.best_other_max = 4, 4
    for name, value in (("limit", limit), ("generator_steps", generator_steps), ("cvae_steps", cvae_steps),
                        ("sft_steps", sft_steps), ("multitask_steps", multitask_steps),
                        ("training_mean_max", training_mean_max), ("best_other_max", best_other_max)):
        if value is not None:
            setattr(settings, name, value)
    if cvae_objective not in ("recon", "sft"):
        raise RegistryError(f"--cvae-objective must be recon or sft, not {cvae_objective!r}")
    settings.cvae_objective = cvae_objective
    if cvae_anchor not in ("none", "multitask") or (cvae_anchor != "none" and cvae_objective != "sft"):
        raise RegistryError("--cvae-anchor takes none or multitask, and multitask only with --cvae-objective sft")
    settings.cvae_anchor = cvae_anchor
    settings.generator_seed = generator_seed
    if sft_anchor_k is not None:
        if sft_anchor_k < 1:
            raise RegistryError("--sft-anchor-k must be >= 1")
        settings.sft_options["retrieved_anchor_k"] = sft_anchor_k
    if sft_anchor_train is not None:
        from generator.sft_service import ANCHOR_TRAINING

        if sft_anchor_k is None or sft_anchor_train not in ANCHOR_TRAINING:
            raise RegistryError(f"--sft-anchor-train takes one of {', '.join(ANCHOR_TRAINING)}, with --sft-anchor-k")
        settings.sft_options["anchor_training"] = sft_anchor_train
    if sft_under_multitask:
        if sft_anchor_k is None:
            raise RegistryError("--sft-under-multitask goes with --sft-anchor-k (the multitask anchor is already the multitask LoRA)")
        settings.sft_options["under"] = "multitask"  # the split's multitask LoRA, resolved when it is trained
    if sft_gate:
        if not sft_under_multitask:
            raise RegistryError("--sft-gate falls back to the adapter under the generator: give --sft-under-multitask")
        settings.sft_gate = True
    if sft_contrast is not None:
        if sft_contrast < 0:
            raise RegistryError("--sft-contrast must be >= 0")
        settings.sft_options["contrast_weight"] = sft_contrast
    for option, key, value in (("--sft-tasks-per-step", "batch_size", sft_tasks_per_step),
                               ("--sft-items-per-task", "items_per_task", sft_items_per_task)):
        if value is not None:
            if value < 1:
                raise RegistryError(f"{option} must be >= 1")
            settings.sft_options[key] = value
    if sft_head is not None:
        from generator.sft_service import GATED_HEADS, HEADS

        if sft_head not in HEADS:
            raise RegistryError(f"--sft-head must be one of {', '.join(HEADS)}, not {sft_head!r}")
        if sft_head in GATED_HEADS and (sft_anchor_k is not None or sft_under_multitask):
            raise RegistryError(f"--sft-head {sft_head} starts from the multitask LoRA: no --sft-anchor-k or "
                                "--sft-under-multitask")
        settings.sft_options["head"] = sft_head
    with open_registry(home) as reg:
        paths = _run(reg, settings, out)
    _print_report(paths, json_output)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Report folder.")] = Path("reports/demo"),
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """The whole story on the embedded defaults: harvest a small zoo, train the generator, generate and
    retrieve+compose an adapter for an unseen task, evaluate both, print the comparison."""
    from evaluation.compare import BenchSettings
    from harvest.service import harvest_task, resolve_task, sample_prompts
    from harvest.train import HarvestConfig

    out_console = console()
    with open_registry(home) as reg:
        out_console.print(f"registry home: {reg.home}")
        config = HarvestConfig(steps=DEMO_STEPS, n_checkpoints=DEMO_KEEP)
        with progress() as bar:
            for name in DEMO_TRAINING_TASKS:
                task_id = bar.add_task(f"harvest {name}", total=config.steps, status="")
                summary = harvest_task(reg, resolve_task(name), config=config,
                                       on_step=lambda s, loss, t=task_id: bar.update(t, completed=s, status=f"loss {loss:.3f}"))
                bar.update(task_id, completed=config.steps,
                           status="already harvested" if summary.skipped else f"{len(summary.refs)} checkpoints")
        from retrieval.service import retrieve

        held_out = resolve_task(DEMO_HELD_OUT)
        hits = retrieve(reg, sample_prompts(held_out), k=3, kind="harvested", one_per_task=True)
        out_console.print(f"nearest harvested adapters for the unseen task {held_out.name!r}: "
                          + ", ".join(f"{h.adapter.ref} ({h.adapter.task}, {h.score:.2f})" for h in hits))
        settings = BenchSettings(held_out=[held_out.name], methods=list(DEMO_METHODS), tasks=list(DEMO_TRAINING_TASKS),
                                 limit=50, generator_steps=150, generator_batch_size=4, sft_steps=100)
        paths = _run(reg, settings, out)
    _print_report(paths, json_output)
    out_console.print(f"registry: {reg.home}")
