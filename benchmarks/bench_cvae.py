"""ICM-LoRA CVAE generator: reconstruction accuracy and storage (issue 8's "must show").

    python benchmarks/bench_cvae.py --home DIR [--generator REF] [--limit N] [--tasks T ...] [--with-base]
                                    [--no-eval] [--device cpu|cuda] [--out results.json]

For every task the CVAE generator was trained on (``--generator``, default the newest
``generator-cvae`` artifact; ``--tasks`` keeps some):

- **Reconstruction.** Accuracy on the task's test split (``harvest.evaluate.evaluate``, the first
  ``--limit`` items) of the adapter the CVAE regenerates from its *stored* task vector
  (``generator.cvae_service.regenerate_task``: no prompts, no base-model forward) vs the stored final
  adapter of the task (the ``final`` alias the harvest sets, else the trained-on checkpoint with
  the highest step). Beside them, in weight space: the relative L2 error of the regenerated weights
  against that final adapter and against the mean of the task's trained-on checkpoints (what
  decoding z = 0 aims at), and the task whose final adapter the regenerated one is nearest to.
  ``--with-base`` adds the base model's accuracy. Tasks that are neither zoo tasks nor task files
  on disk get the weight-space figures only.
- **Storage.** The generator artifact's bytes (split into CVAE weights, normaliser, task vectors)
  vs the total bytes of the adapters it can regenerate: every trained-on adapter (all checkpoints),
  and one final adapter per task.

Weight-space columns: ``relerr`` ||regenerated - final|| / ||final||, ``tmean`` the same against
the mean of the task's checkpoints, ``allmean`` the relerr of the mean training adapter (what an
element-centred CVAE decodes when it learned nothing task-specific) against the final adapter,
``moved`` how far the regenerated adapter is from that mean (relative), ``nearest`` the task
whose final adapter is nearest.

Prints a table and the JSON record (also written to ``--out``). The registry is only read: the
regenerated adapters are evaluated in memory and never stored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def tensor_bytes(tensors: dict, prefix: str) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix))


def final_adapter(reg, refs: list[str]):
    """The final adapter among a task's trained-on checkpoints: alias ``final``, else the highest step."""
    infos = [reg.resolve(ref) for ref in refs]
    for info in infos:
        if "final" in (info.aliases or []):
            return info
    return max(infos, key=lambda i: (int((i.recipe or {}).get("step", -1)), i.version))


def flat(state_dict: dict, keys: list[str]):
    import torch

    return torch.cat([state_dict[k].detach().float().reshape(-1) for k in keys])


def storage_report(reg, info, tensors: dict, finals: dict) -> dict:
    adapters = [reg.resolve(a["ref"]) for a in info.meta["adapters"]]
    all_bytes = sum(a.size_bytes for a in adapters)
    final_bytes = sum(a.size_bytes for a in finals.values())
    basis = tensor_bytes(tensors, "cvae.basis")
    parts = {"cvae_weights": tensor_bytes(tensors, "cvae.") - basis, "cvae_basis": basis,
             "normalizer": tensor_bytes(tensors, "normalizer."), "task_vectors": tensor_bytes(tensors, "task_vector.")}
    return {
        "generator_bytes": info.size_bytes,
        "generator_parts_bytes": parts,
        "cvae_parameters": info.meta.get("cvae_parameters"),
        "normalizer_center": info.meta.get("training", {}).get("center"),
        "adapters": len(adapters),
        "adapters_bytes": all_bytes,
        "one_adapter_bytes": adapters[0].size_bytes if adapters else 0,
        "final_adapters": len(finals),
        "final_adapters_bytes": final_bytes,
        "generator_vs_all_adapters": info.size_bytes / all_bytes if all_bytes else None,
        "generator_vs_final_adapters": info.size_bytes / final_bytes if final_bytes else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, type=Path, help="Registry home holding the CVAE generator.")
    parser.add_argument("--generator", default=None, help="CVAE generator REF (default: the newest generator-cvae).")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate the first N test items of each task.")
    parser.add_argument("--tasks", nargs="*", default=None, help="Only these of the generator's tasks.")
    parser.add_argument("--with-base", action="store_true", help="Also evaluate the base model alone.")
    parser.add_argument("--no-eval", action="store_true", help="Weight-space and storage figures only (fast).")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--batch-size", type=int, default=16, help="Evaluation batch size.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON record here.")
    args = parser.parse_args(argv)

    import torch

    from generator.cvae_service import regenerate_task
    from generator.service import (CVAE_ARTIFACT_TYPE, GeneratorError, generator_peft_config,
                                   resolve_any_generator)
    from harvest.evaluate import evaluate
    from harvest.service import resolve_task
    from harvest.tasks import TaskError
    from registry.store import Registry

    with Registry.open(args.home) as reg:
        if args.generator is None:
            info = reg.latest_artifact(CVAE_ARTIFACT_TYPE)
            if info is None:
                raise SystemExit(f"no {CVAE_ARTIFACT_TYPE} artifact in {args.home}: run "
                                 "`registry train-generator --arch cvae` first")
        else:
            info = resolve_any_generator(reg, args.generator)
            if info.artifact_type != CVAE_ARTIFACT_TYPE:
                raise SystemExit(f"{info.ref} is a {info.artifact_type}, not a {CVAE_ARTIFACT_TYPE}")
        meta = info.meta
        tensors, _ = reg.load_artifact(info.ref)
        tasks = meta["tasks"] if args.tasks is None else [t for t in meta["tasks"] if t in args.tasks]
        unknown = sorted(set(args.tasks or []) - set(meta["tasks"]))
        if unknown:
            raise SystemExit(f"{info.ref} was not trained on {', '.join(unknown)} (its tasks: {', '.join(meta['tasks'])})")
        refs_by_task: dict[str, list[str]] = {}
        for adapter in meta["adapters"]:
            refs_by_task.setdefault(adapter["task"], []).append(adapter["ref"])
        finals = {task: final_adapter(reg, refs) for task, refs in refs_by_task.items()}
        storage = storage_report(reg, info, tensors, finals)
        peft_config = generator_peft_config(meta)
        base = meta["base_model"]

        final_weights = {t: reg.load_weights(f.ref)[0] for t, f in finals.items()}
        keys = sorted(next(iter(final_weights.values())))
        final_flat = {t: flat(sd, keys) for t, sd in final_weights.items()}
        task_sums, count = {}, 0  # running sums: every trained-on adapter is loaded once
        for task, refs in refs_by_task.items():
            for ref in refs:
                vector = flat(reg.load_weights(ref)[0], keys)
                task_sums[task] = task_sums[task] + vector if task in task_sums else vector
            count += len(refs)
        task_means = {t: task_sums[t] / len(refs_by_task[t]) for t in task_sums}
        overall_mean = sum(task_sums.values()) / count  # the mean training adapter
        rows = []
        print(f"generator {info.ref} ({meta.get('steps')} steps, final loss {meta.get('final_loss'):.4f}) on "
              f"{len(meta['tasks'])} tasks, base {base}", file=sys.stderr)
        for task in tasks:
            row = {"task": task, "final_ref": finals[task].ref}
            start = time.perf_counter()
            try:
                regenerated = regenerate_task(reg, info.ref, task, device=args.device)
            except GeneratorError as err:
                raise SystemExit(str(err)) from None
            row["regenerate_s"] = time.perf_counter() - start
            regen = flat(regenerated, keys)
            mean, final = task_means[task], final_flat[task]
            row["rel_err_vs_final"] = float((regen - final).norm() / final.norm())
            row["rel_err_vs_task_mean"] = float((regen - mean).norm() / mean.norm())
            # baselines: the mean training adapter (what a CVAE that learned nothing task-specific
            # decodes to with an element-centred normaliser), and how far the regenerated one moved from it
            row["rel_err_training_mean_vs_final"] = float((overall_mean - final).norm() / final.norm())
            row["rel_dist_from_training_mean"] = float((regen - overall_mean).norm() / overall_mean.norm())
            row["cosine_vs_final"] = float(torch.nn.functional.cosine_similarity(regen, final_flat[task], dim=0))
            row["nearest_final"] = min(final_flat, key=lambda t: float((regen - final_flat[t]).norm()))
            if args.no_eval:
                rows.append(row)
                continue
            try:
                task_obj = resolve_task(task)
            except (TaskError, OSError, ValueError) as err:
                row["skipped_eval"] = f"not a zoo task or task file ({str(err).splitlines()[0]})"
                rows.append(row)
                continue
            kwargs = dict(base=base, limit=args.limit, device=args.device, batch_size=args.batch_size)
            print(f"[{task}] evaluating the stored final adapter {finals[task].ref}", file=sys.stderr)
            stored = evaluate(task_obj, adapter=str(reg.fetch(finals[task].ref)), **kwargs)
            print(f"[{task}] evaluating the regenerated adapter", file=sys.stderr)
            regen_eval = evaluate(task_obj, adapter=regenerated, lora=peft_config, **kwargs)
            row |= {"metric": task_obj.metric, "n": stored.n, "acc_final": stored.accuracy,
                    "acc_regenerated": regen_eval.accuracy,
                    "agreement": sum(a.prediction.strip() == b.prediction.strip()
                                     for a, b in zip(stored.predictions, regen_eval.predictions)) / max(1, stored.n)}
            if args.with_base:
                row["acc_base"] = evaluate(task_obj, **kwargs).accuracy
            rows.append(row)

    evaluated = [r for r in rows if "acc_regenerated" in r]
    means = {key: sum(r[key] for r in evaluated) / len(evaluated)
             for key in ("acc_final", "acc_regenerated", "agreement", "rel_err_vs_final") if evaluated}
    record = {"generator": info.ref, "generator_digest": info.sha256, "base_model": base,
              "steps": meta.get("steps"), "final_loss": meta.get("final_loss"), "config": meta.get("config"),
              "limit": args.limit, "storage": storage, "tasks": rows, "evaluated_tasks": len(evaluated),
              "means": means}
    print_table(record)
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return record


def print_table(record: dict) -> None:
    def pct(value):
        return "-" if value is None else f"{100 * value:5.1f}%"

    print(f"\nReconstruction by {record['generator']} (test split, limit {record['limit']}):")
    header = (f"  {'task':<20} {'n':>4} {'base':>7} {'final':>7} {'regen':>7} {'agree':>7} {'relerr':>7} "
              f"{'tmean':>7} {'allmean':>7} {'moved':>7} nearest")
    print(header)
    for row in record["tasks"]:
        print(f"  {row['task']:<20} {row.get('n', '-')!s:>4} {pct(row.get('acc_base')):>7} {pct(row.get('acc_final')):>7} "
              f"{pct(row.get('acc_regenerated')):>7} {pct(row.get('agreement')):>7} {row['rel_err_vs_final']:7.3f} "
              f"{row['rel_err_vs_task_mean']:7.3f} {row['rel_err_training_mean_vs_final']:7.3f} "
              f"{row['rel_dist_from_training_mean']:7.3f} {row['nearest_final']}")
    means = record.get("means") or {}
    if means:
        print(f"  {'mean of ' + str(record['evaluated_tasks']) + ' evaluated':<25} {'':>7} "
              f"{pct(means['acc_final']):>7} {pct(means['acc_regenerated']):>7} {pct(means['agreement']):>7} "
              f"{means['rel_err_vs_final']:7.3f}")
    print("  (relerr: ||regenerated - final|| / ||final||; tmean: the same against the mean of the task's "
          "checkpoints;\n   allmean: the mean training adapter's relerr against the final one; moved: "
          "||regenerated - mean training adapter|| / ||mean training adapter||)")
    s = record["storage"]
    parts = ", ".join(f"{k} {_mb(v)}" for k, v in s["generator_parts_bytes"].items())
    print(f"\nStorage: generator {_mb(s['generator_bytes'])} ({parts}; {s['cvae_parameters']} CVAE parameters, "
          f"normaliser centred per {s['normalizer_center']})")
    print(f"  vs all {s['adapters']} trained-on adapters {_mb(s['adapters_bytes'])}: "
          f"{100 * s['generator_vs_all_adapters']:.1f}%")
    print(f"  vs {s['final_adapters']} final adapters (one per task) {_mb(s['final_adapters_bytes'])}: "
          f"{100 * s['generator_vs_final_adapters']:.1f}%  (one adapter: {_mb(s['one_adapter_bytes'])})\n")


if __name__ == "__main__":
    main()
