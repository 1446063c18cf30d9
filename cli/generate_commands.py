"""Commands of the generators (DnD, ICM-LoRA CVAE): train-generator, generate, regenerate, generators.

Each parses, calls one function of ``generator.service`` (``regenerate``: of
``generator.cvae_service``), prints. torch and the encoder are imported inside the command bodies
so ``registry --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.app import (HomeOption, JsonOption, PrecisionOption, PromptsOption, app, console, open_registry, print_json,
                     progress)

TasksOption = Annotated[list[str], typer.Option("--tasks", help="Train only on these tasks (repeatable).")]
ExcludeOption = Annotated[list[str], typer.Option("--exclude-tasks", help="Hold these tasks out (repeatable).")]
# CVAE-only options (None: the service's default); refused with --arch dnd.
CVAE_CLI_OPTIONS = {"latent_dim": "--latent-dim", "positions": "--positions", "flat_channels": "--flat-channels",
                    "cond_embed": "--cond-embed", "basis_dim": "--basis-dim", "kl_weight": "--kl-weight",
                    "center": "--center", "max_length": "--max-length"}




def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


@app.command("train-generator")
def train_generator(
    tasks: TasksOption = [],
    exclude_tasks: ExcludeOption = [],
    arch: Annotated[str, typer.Option(help="Generator architecture: dnd (Drag-and-Drop) or cvae (ICM-LoRA).")] = "dnd",
    objective: Annotated[str, typer.Option(help="recon (regress harvested weights), sft (train through the base model on the tasks' answers; cvae: after --recon-steps of recon) or, dnd only, both (sft + reconstruction as a regulariser).")] = "recon",
    recon_weight: Annotated[Optional[float], typer.Option("--recon-weight", help="both: weight of the reconstruction term (default 0.1).")] = None,
    contrast_weight: Annotated[Optional[float], typer.Option("--contrast-weight", help="sft/both: weight of the condition-sensitivity hinge (each task's items must score better under its own generated LoRA than under another task's; default 0: off).")] = None,
    anchor: Annotated[Optional[str], typer.Option(help="sft: the adapter the generated LoRA starts from: multitask (dnd's default; trained on the same tasks first if missing), retrieved (dnd: the fusion of the --anchor-k training adapters nearest to the prompts), none (dnd: random A, B = 0; cvae's default: it decodes the whole adapter) or a REF. cvae takes none, multitask or a REF: the decoded deviation is then added to that adapter.")] = None,
    anchor_k: Annotated[Optional[int], typer.Option("--anchor-k", help="sft with --anchor retrieved: training adapters fused into the anchor (default 3).")] = None,
    anchor_train: Annotated[Optional[str], typer.Option("--anchor-train", help="sft with --anchor retrieved: what a training task retrieves as its anchor: others (default; leave-one-out, never itself) or own (as at generation: its nearest adapters, itself first).")] = None,
    under: Annotated[Optional[str], typer.Option("--under", help="dnd sft: an adapter every generated LoRA sits on, multitask (trained on the same tasks first if missing) or a REF: applied to the base throughout training and stacked under each generated adapter (rank doubles).")] = None,
    items_per_task: Annotated[int, typer.Option("--items-per-task", help="sft (dnd and cvae): train items per task per step.")] = 4,
    head: Annotated[str, typer.Option(help="sft: residual (anchor + the hyper-convolutional decoder's residual) gated (the anchor LoRA trained on every task, its rank components scaled by gains an MLP reads from the prompts) or routed (those gains a similarity-weighted mix of one learned gain vector per training task).")] = "residual",
    steps: Annotated[int, typer.Option(help="Training steps (a rerun with more steps continues).")] = 2000,
    recon_steps: Annotated[Optional[int], typer.Option("--recon-steps", help="cvae with --objective sft: reconstruction steps before the SFT --steps (default 200).")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Pairs per step: (checkpoint, N prompts) for dnd (default 8), (checkpoint, task vector) for cvae (default 4); with --objective sft, tasks per step (default 2).")] = None,
    n_prompts: Annotated[int, typer.Option("--n-prompts", help="dnd, and cvae with --objective sft: N, prompts per condition.")] = 16,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="dnd: L, encoder tokens kept per prompt.")] = 64,
    layers: Annotated[int, typer.Option("--layers", help="dnd: hyper-convolutional layers.")] = 4,
    kernel: Annotated[int, typer.Option(help="dnd: convolution kernel size (odd).")] = 5,
    hidden_tokens: Annotated[int, typer.Option("--hidden-tokens", help="dnd: largest N before the last layer.")] = 64,
    spread_weighting: Annotated[bool, typer.Option(help="dnd: weight the loss per token by 1/spread across checkpoints.")] = False,
    latent_dim: Annotated[Optional[int], typer.Option("--latent-dim", help="cvae: latent size Z (default 256).")] = None,
    positions: Annotated[Optional[int], typer.Option("--positions", help="cvae: target length P after the conv stack (default 512).")] = None,
    flat_channels: Annotated[Optional[int], typer.Option("--flat-channels", help="cvae: channels F_c flattened into the latent heads (default 4).")] = None,
    cond_embed: Annotated[Optional[int], typer.Option("--cond-embed", help="cvae: projected task-vector size E (default 128).")] = None,
    basis_dim: Annotated[Optional[int], typer.Option("--basis-dim", help="cvae: learned basis directions K (default: one per training task, at most 64; 0: the paper's conv-only decoder).")] = None,
    kl_weight: Annotated[Optional[float], typer.Option("--kl-weight", help="cvae: weight of the KL term (default 1e-3).")] = None,
    center: Annotated[Optional[str], typer.Option(help="cvae: normaliser centring, element (default; stores the mean adapter) or token (smaller).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="cvae: prompt tokens kept for the task vector (default 512).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and sampling.")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", help="Save the training state every M steps.")] = 100,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Only adapters of this base model.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Artifact name, a new version each time (default: the arch).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 (default: CUDA when present).")] = None,
    precision: PrecisionOption = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard saved training state and start over.")] = False,
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Train a generator (DnD, or with --arch cvae the ICM-LoRA CVAE) on the harvested adapters and
    store it as a versioned artifact."""
    from generator.service import ARCHES, train_generator_from_registry
    from registry.errors import RegistryError

    if arch not in ARCHES:
        raise RegistryError(f"--arch must be one of {', '.join(ARCHES)}, not {arch!r}")
    given = {"latent_dim": latent_dim, "positions": positions, "flat_channels": flat_channels,
             "cond_embed": cond_embed, "basis_dim": basis_dim, "kl_weight": kl_weight, "center": center,
             "max_length": max_length}
    given = {k: v for k, v in given.items() if v is not None}
    if recon_weight is not None and objective != "both":
        raise RegistryError("--recon-weight applies to --objective both only")
    if contrast_weight is not None and objective not in ("sft", "both"):
        raise RegistryError("--contrast-weight applies to --objective sft or both only")
    if anchor is not None and objective not in ("sft", "both"):
        raise RegistryError("--anchor applies to --objective sft or both only")
    anchor = anchor or ("none" if arch == "cvae" else "multitask")
    if anchor_k is not None and (objective not in ("sft", "both") or anchor != "retrieved"):
        raise RegistryError("--anchor-k applies to --objective sft with --anchor retrieved only")
    if under is not None and (arch != "dnd" or objective not in ("sft", "both") or head != "residual"):
        raise RegistryError("--under applies to --arch dnd --objective sft (or both) with the residual head only")
    if under is not None and under == anchor:
        raise RegistryError(f"--under {under} is already the anchor: use --anchor retrieved, none or another REF")
    if anchor_train is not None and (objective not in ("sft", "both") or anchor != "retrieved"):
        raise RegistryError("--anchor-train applies to --objective sft with --anchor retrieved only")
    from generator.sft_service import ANCHOR_TRAINING, DEFAULT_ANCHOR_K, GATED_HEADS, HEADS

    if head not in HEADS:
        raise RegistryError(f"--head must be one of {', '.join(HEADS)}, not {head!r}")
    if head in GATED_HEADS and (objective != "sft" or anchor == "retrieved"):
        raise RegistryError(f"--head {head} applies to --objective sft with a fixed anchor (multitask, none or a REF)")
    if arch == "cvae" and (objective == "both" or head != "residual" or contrast_weight is not None
                           or anchor == "retrieved"):
        raise RegistryError("--arch cvae takes --objective recon or sft, with no --head, --contrast-weight or "
                            "retrieved --anchor")
    if recon_steps is not None and not (arch == "cvae" and objective == "sft"):
        raise RegistryError("--recon-steps applies to --arch cvae --objective sft only")
    if arch == "cvae":
        options = {**given, "seed": seed, "save_every": save_every, "base_model": base_model}
        if objective == "sft":
            options |= dict(n_prompts=n_prompts, items_per_task=items_per_task)
            if recon_steps is not None:
                options["recon_steps"] = recon_steps
    elif objective in ("sft", "both"):
        if given or spread_weighting:
            raise RegistryError(f"the CVAE options and --spread-weighting do not apply to --objective {objective}")
        options = dict(n_prompts=n_prompts, prompt_tokens=prompt_tokens, n_layers=layers, kernel=kernel,
                       hidden_tokens=hidden_tokens, seed=seed, save_every=save_every, base_model=base_model,
                       items_per_task=items_per_task)
        if recon_weight is not None:
            options["recon_weight"] = recon_weight
        if contrast_weight is not None:
            options["contrast_weight"] = contrast_weight
        if head in GATED_HEADS:  # no decoder: only the condition's shape is kept
            options = {k: v for k, v in options.items() if k not in ("n_layers", "kernel", "hidden_tokens")}
            options["head"] = head
        if anchor == "retrieved":
            if anchor_k is not None and anchor_k < 1:
                raise RegistryError("--anchor-k must be >= 1")
            options["retrieved_anchor_k"] = DEFAULT_ANCHOR_K if anchor_k is None else anchor_k
            if anchor_train is not None:
                if anchor_train not in ANCHOR_TRAINING:
                    raise RegistryError(f"--anchor-train must be one of {', '.join(ANCHOR_TRAINING)}, not {anchor_train!r}")
                options["anchor_training"] = anchor_train
    else:
        if given:
            raise RegistryError(f"{', '.join(CVAE_CLI_OPTIONS[k] for k in given)} only apply to --arch cvae")
        options = dict(n_prompts=n_prompts, prompt_tokens=prompt_tokens, n_layers=layers, kernel=kernel,
                       hidden_tokens=hidden_tokens, spread_weighting=spread_weighting, seed=seed,
                       save_every=save_every, base_model=base_model)
    err = console_err()
    with open_registry(home) as reg, progress() as bar:
        if objective in ("sft", "both"):
            tasks, options["task_items"], options["anchor"], under_ref = _sft_inputs(reg, tasks, exclude_tasks,
                                                                                     anchor, under, bar)
            if under_ref is not None:
                options["under"] = under_ref
        task_id = bar.add_task(f"train-generator ({arch}{', ' + objective if objective != 'recon' else ''})", total=steps,
                               status="starting")

        def on_step(step: int, total: int, loss: float):
            bar.update(task_id, completed=step, total=total, status=f"loss {loss:.4f}")

        info = train_generator_from_registry(
            reg, name=name, tasks=tasks or None, exclude_tasks=exclude_tasks, steps=steps, lr=lr,
            batch_size=batch_size, device=device, on_step=on_step, resume=not fresh,
            on_status=lambda message: bar.update(task_id, status=message), arch=arch, precision=precision,
            objective=objective, **options)
        bar.update(task_id, completed=steps)
    if json_output:
        print_json(info.to_dict())
        return
    meta = info.meta
    err.print(f"trained on {len(meta['adapters'])} adapters of {len(meta['tasks'])} tasks "
              f"({', '.join(meta['tasks'])}) in {_seconds(meta['wall_time_s'])} ({meta['training'].get('precision', 'fp32')}); "
              f"final loss {meta['final_loss']:.4f}",
              soft_wrap=True)
    console().print(f"stored [bold]{info.ref}[/bold] sha256:{info.sha256}", soft_wrap=True)


def _sft_inputs(reg, tasks: list[str], exclude_tasks: list[str], anchor: str, under: str | None, bar):
    """(task names, task -> [(prompt, answer)] of their train items, anchor REF or None, under REF or
    None) for the SFT objective. Tasks: the given zoo names / .jsonl files, else every finished harvest;
    ``anchor`` or ``under`` multitask trains the multitask LoRA of these tasks first when it is not
    stored yet."""
    from evaluation.compare import harvested_tasks
    from harvest.service import resolve_task

    loaded = [resolve_task(spec) for spec in (tasks or harvested_tasks(reg))]
    loaded = [t for t in loaded if t.name not in set(exclude_tasks)]
    items = {t.name: [(e.prompt, e.answer) for e in t.split("train")] for t in loaded}

    def adapter_ref(value: str | None, role: str) -> str | None:
        if value in (None, "none", "retrieved"):  # retrieved: the anchor is found per task from the harvests
            return None
        return _multitask_ref(reg, loaded, role, bar) if value == "multitask" else reg.resolve(value).ref

    return [t.name for t in loaded], items, adapter_ref(anchor, "the anchor"), adapter_ref(under, "under the generated")


def _multitask_ref(reg, loaded: list, role: str, bar) -> str:
    """The multitask LoRA of the ``loaded`` tasks: trained first (progress shown) when not stored yet."""
    from harvest.service import harvest_multitask

    task_id = bar.add_task(f"multitask LoRA ({role})", total=None, status="")
    summary = harvest_multitask(reg, loaded, on_step=lambda step, loss: bar.update(task_id, completed=step,
                                                                                 status=f"loss {loss:.3f}"))
    bar.update(task_id, status="already trained" if summary.skipped else f"stored {summary.refs[-1]}")
    return summary.refs[-1]


def console_err():
    from cli.app import console_stderr

    return console_stderr()


@app.command()
def generate(
    name: Annotated[str, typer.Option(help="Name of the new adapter.")],
    prompts: PromptsOption = None,
    task: Annotated[Optional[str], typer.Option(help="Take prompts from a task: a zoo task name or a task .jsonl file.")] = None,
    generator: Annotated[Optional[str], typer.Option(help="Generator artifact REF, DnD or CVAE (default: the latest DnD generator).")] = None,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Refuse unless the generator targets this base model.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda (default: CUDA when present).")] = None,
    gate: Annotated[bool, typer.Option("--gate", help="For a generator trained --under an adapter: store that adapter alone unless the base model answers the prompts more surely (lower first-token entropy) with the generated one (costs two forward passes of the base over 16 prompts).")] = False,
    precision: PrecisionOption = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Generate an adapter from prompts with a trained generator (DnD or CVAE) and print its REF."""
    from generator.service import generate_adapter
    from registry.errors import RegistryError
    from registry.prompts import read_prompts_file

    if (prompts is None) == (task is None):
        raise RegistryError("give either --prompts FILE or --task TASK")
    if prompts is not None:
        task_name, prompt_list = None, read_prompts_file(prompts)
    else:
        from harvest.service import task_prompt_sample  # the zoo: only when a task is named

        task_name, prompt_list = task_prompt_sample(task)
    timings: dict = {}
    with open_registry(home) as reg:
        info = generate_adapter(reg, prompt_list, name, generator_ref=generator, task=task_name,
                                base_model=base_model, device=device, timings=timings, precision=precision,
                                gate=gate)
    if json_output:
        print_json(info.to_dict() | {"timings": timings})
        return
    console().print(f"generated [bold]{info.ref}[/bold] sha256:{info.digest}", soft_wrap=True)
    console_err().print(
        f"{len(prompt_list)} prompts -> {timings['generator']} on {timings['device']}: "
        f"load generator {_seconds(timings['load_s'])}, "
        f"{'base model' if timings.get('arch') == 'cvae' else 'encoder'} {_seconds(timings['encoder_s'])}, "
        f"{'task vector' if timings.get('arch') == 'cvae' else 'embed'} {_seconds(timings['embed_s'])}, "
        f"decode {_seconds(timings['decode_s'])}, "
        + (f"gate {_seconds(timings['gate_s'])} (kept the {timings['gate']['kept']} adapter), " if gate else "")
        + f"store {_seconds(timings['store_s'])}; "
        f"total {_seconds(timings['total_s'])} ({timings['precision']})", soft_wrap=True)


@app.command()
def regenerate(
    task: Annotated[str, typer.Argument(help="A task the CVAE generator was trained on.")],
    name: Annotated[str, typer.Option(help="Name of the new adapter.")],
    generator: Annotated[Optional[str], typer.Option(help="CVAE generator artifact REF (default: the latest).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda (default: CUDA when present).")] = None,
    precision: PrecisionOption = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Re-create a training task's adapter from a CVAE generator's stored task vector and store it."""
    from generator.cvae_service import regenerate_adapter

    with open_registry(home) as reg:
        info = regenerate_adapter(reg, generator, task, name, device=device, precision=precision)
    if json_output:
        print_json(info.to_dict())
        return
    console().print(f"regenerated [bold]{info.ref}[/bold] sha256:{info.digest} (task {task}, "
                    f"from {info.recipe['generator']})", soft_wrap=True)


@app.command()
def generators(home: HomeOption = None, json_output: JsonOption = False):
    """List the stored generator artifacts."""
    from generator.service import list_generators

    with open_registry(home) as reg:
        artifacts = list_generators(reg)
    if json_output:
        print_json([a.to_dict() for a in artifacts])
        return
    from rich.table import Table

    table = Table(title=f"{len(artifacts)} generators")
    for column in ("ref", "type", "base model", "tasks", "adapters", "steps", "loss", "created"):
        table.add_column(column, overflow="fold")
    for a in artifacts:
        meta = a.meta
        loss = meta.get("final_loss")
        table.add_row(a.ref, a.artifact_type, a.base_model or "-", str(len(meta.get("tasks", []))),
                      str(len(meta.get("adapters", []))), str(meta.get("steps", "-")),
                      "-" if loss is None else f"{loss:.4f}", a.created_at.strftime("%Y-%m-%d %H:%M"))
    console().print(table)
