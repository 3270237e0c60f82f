"""Command line: ``kdtrain make-toy | smoke | train | info | export | annotate``."""

from __future__ import annotations

import argparse
import sys


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    """CONFIG files and section.key=value overrides, in any order."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def cmd_make_toy(a) -> int:
    from .toy import make_toy

    paths = make_toy(a.out_dir, a.samples, a.steps, a.dmodel, a.nlayers, a.vocab)
    for key in ("dataset", "config", "model_init", "tokenizer"):
        print(f"{key:10s} {paths[key]}")
    return 0


def cmd_smoke(a) -> int:
    from .smoke import run_smoke

    return 0 if run_smoke(a.out_dir) else 1


def cmd_train(a) -> int:
    from .config import ConfigError, load_config
    from .trainer import Interrupted, Trainer

    files, overrides = _split(a.items)
    if not files:
        raise ConfigError("kdtrain train: give at least one CONFIG file")
    cfg, _ = load_config(files, overrides)
    trainer = Trainer(cfg, resume=a.resume)
    try:
        rows = trainer.fit()
    except Interrupted as e:
        if trainer.dist.rank == 0:
            print(f"kdtrain train: {e}", file=sys.stderr)
        trainer.dist.close()
        return 128 + e.signum
    if trainer.dist.rank == 0:
        last = f"step {rows[-1]['step']}, total {rows[-1]['total']:.4f}" if rows else f"already at step {trainer.step}"
        print(f"done: {last}; run directory {trainer.run_dir}")
    trainer.dist.close()
    return 0


def cmd_info(a) -> int:
    import yaml

    from .config import ConfigError, load_config
    from .model import flops_per_token, memory_estimate, param_counts

    files, overrides = _split(a.items)
    if not files:
        raise ConfigError("kdtrain info: give at least one CONFIG file")
    if a.world_size < 1:
        raise ConfigError(f"--world-size must be at least 1, got {a.world_size}.")
    cfg, _ = load_config(files, overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    n = param_counts(cfg.arch)
    print(f"\nparameters       {n['total']:,} ({n['total'] / 1e9:.3f} B); matmul (excl. input embedding) "
          f"{n['matmul']:,}")
    for S in cfg.train.seq_lengths:
        print(f"FLOPs per token  {flops_per_token(cfg.arch, S):.4g} at seq {S} (6 N_matmul + 12 L d S)")
    mem = memory_estimate(cfg, a.world_size)
    parts = ", ".join(f"{k} {mem[k] / 2**30:.2f}" for k in ("state", "activations", "root", "loss"))
    print(f"memory per GPU   {mem['total'] / 2**30:.2f} GiB peak at world size {a.world_size}: building the model "
          f"{mem['build'] / 2**30:.2f}, end of forward {mem['forward_end'] / 2**30:.2f}, backward "
          f"{mem['backward'] / 2**30:.2f} (of which {parts} GiB)")
    return 0


def cmd_export(a) -> int:
    from .checkpoint import export_hf

    print(f"exported {export_hf(a.checkpoint, a.out_dir)}")
    return 0


def cmd_annotate(a) -> int:
    from .annotate import annotate

    annotate(a.input, a.output, a.teacher, a.tokenizer, k=a.k, temperature=a.temperature,
             batch_size=a.batch_size, max_len=a.max_len, device=a.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdtrain", description="Knowledge distillation for decoder-only LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-toy", help="build the toy tokenizer, dataset, model and config (offline, seeded)")
    m.add_argument("--out-dir", default="toy")
    m.add_argument("--samples", type=int, default=10)
    m.add_argument("--steps", type=int, default=5)
    m.add_argument("--dmodel", type=int, default=64)
    m.add_argument("--nlayers", type=int, default=2)
    m.add_argument("--vocab", type=int, default=32000)
    m.set_defaults(fn=cmd_make_toy)

    s = sub.add_parser("smoke", help="check the toy pipeline end to end and print a report")
    s.add_argument("--out-dir", default=None, help="keep the artifacts here (default: a temporary directory)")
    s.set_defaults(fn=cmd_smoke)

    t = sub.add_parser("train", help="train: kdtrain train CONFIG [CONFIG ...] [section.key=value ...]")
    t.add_argument("items", nargs="+", metavar="CONFIG|section.key=value")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in io.output_dir")
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("info", help="resolved config, parameter count, FLOPs per token, memory per GPU")
    i.add_argument("items", nargs="+", metavar="CONFIG|section.key=value")
    i.add_argument("--world-size", type=int, default=1)
    i.set_defaults(fn=cmd_info)

    e = sub.add_parser("export", help="consolidated Hugging Face model (safetensors) from a checkpoint")
    e.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/toy/checkpoints/step_00000050")
    e.add_argument("out_dir")
    e.set_defaults(fn=cmd_export)

    n = sub.add_parser("annotate", help="run a local teacher over KD JSONL and store response_ids + teacher_topk")
    n.add_argument("input")
    n.add_argument("output")
    n.add_argument("--teacher", required=True, help="local Hugging Face causal LM directory")
    n.add_argument("--tokenizer", required=True, help="the student's tokenizer directory")
    n.add_argument("--k", type=int, default=64)
    n.add_argument("--temperature", type=float, default=1.0)
    n.add_argument("--batch-size", type=int, default=8)
    n.add_argument("--max-len", type=int, default=4096)
    n.add_argument("--device", default="auto")
    n.set_defaults(fn=cmd_annotate)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .trainer import TrainingError

    parser = build_parser()
    # Options and CONFIG/override items in any order: argparse stops filling `items` at the first
    # option (`train CFG --resume train.steps=60`), so what it leaves over joins the items.
    args, extra = parser.parse_known_args(argv)
    if extra:
        unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "items")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.items += extra
    try:
        return args.fn(args)
    except (CheckpointError, ConfigError, DataError, TrainingError) as e:
        print(f"kdtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission, a vanished file: the OS's words and the path
        print(f"kdtrain {args.command}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdtrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
