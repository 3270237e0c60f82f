"""Command line: ``kdtrain make-toy | smoke | train | info | export | annotate | gen-data | serve-teacher``."""

from __future__ import annotations

import argparse
import socket
import sys


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    """CONFIG files and section.key=value overrides, in any order."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def _check_out_dir(out_dir: str | None) -> None:
    """--out-dir, or a directory above it, that is a file: say which, before anything is built."""
    from .config import ConfigError, file_in_the_way

    blocking = file_in_the_way(out_dir) if out_dir is not None else None
    if blocking is not None:
        raise ConfigError(f"--out-dir {out_dir}: {blocking} is a file, not a directory; choose another path.")


def cmd_make_toy(a) -> int:
    from .toy import make_toy, make_toy_pair

    _check_out_dir(a.out_dir)
    paths = make_toy(a.out_dir, a.samples, a.steps, a.dmodel, a.nlayers, a.vocab)
    for key in ("dataset", "config", "model_init", "tokenizer"):
        print(f"{key:10s} {paths[key]}")
    print(f"{'pair':10s} {make_toy_pair(a.out_dir, a.samples)['teacher']} (a teacher with another tokenizer)")
    from importlib.util import find_spec

    if not all(find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        print("conversion toys not built: they need the export extra (pip install 'kdtrain[export]')")
        return 0
    from .export import make_conversion_toys

    for key, path in make_conversion_toys(a.out_dir).items():
        print(f"{key:10s} {path}")
    return 0


def cmd_smoke(a) -> int:
    from .smoke import run_smoke

    _check_out_dir(a.out_dir)
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


GPU_SIZES = {"H100 80 GB": 79.2, "H200 141 GB": 139.8}  # the memory torch reports for each card


def cmd_info(a) -> int:
    import yaml

    from .config import ConfigError, load_config
    from .model import checkpointed_layers, flops_per_token, memory_estimate, param_counts, reshards_after_forward

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
          f"{mem['backward'] / 2**30:.2f} (of which {parts} GiB)"
          + (" with every layer checkpointed" if cfg.train.grad_checkpointing == "auto" else ""))
    t, L = cfg.train, cfg.arch.n_layers
    if t.grad_checkpointing == "auto":  # the estimate above checkpoints every layer
        for name, gib in GPU_SIZES.items():
            plan = ", ".join(f"seq {S}: {checkpointed_layers(cfg, a.world_size, S, int(gib * 2**30))}"
                             for S in t.seq_lengths)
            print(f"grad_checkpointing auto on {name} ({gib} GiB): decoder layers checkpointed of {L}: {plan}")
    if t.reshard_after_forward == "auto" and a.world_size > 1:  # the estimate above reshards
        for name, gib in GPU_SIZES.items():
            size = int(gib * 2**30)
            plan = ", ".join(f"seq {S}: " + ("reshard" if reshards_after_forward(
                cfg, a.world_size, S, checkpointed_layers(cfg, a.world_size, S, size), size) else "keep")
                for S in t.seq_lengths)
            print(f"reshard_after_forward auto on {name} ({gib} GiB): gathered weights after the forward: {plan}")
    return 0


def cmd_export(a) -> int:
    from .export import export

    out, probe = export(a.checkpoint, a.out_dir, a.format, a.precision)
    print(f"exported {out} ({a.format})")
    if a.format == "coreml" and probe is None:
        print("probe not run: Core ML predicts only on macOS (conversion and spec done here)")
    if probe is None:
        return 0
    print(probe.report())
    return 1 if probe.first_divergence else 0


def cmd_annotate(a) -> int:
    from .annotate import annotate

    annotate(a.input, a.output, a.teacher, a.tokenizer, k=a.k, temperature=a.temperature,
             batch_size=a.batch_size, max_len=a.max_len, device=a.device, teacher_tokenizer=a.teacher_tokenizer)
    return 0


def cmd_gen_data(a) -> int:
    from dataclasses import fields

    from .gendata import GenConfig, gen_data

    cfg = GenConfig(**{f.name: getattr(a, f.name) for f in fields(GenConfig)})
    summary = gen_data(cfg)
    if cfg.dry_run:
        print(f"dry run: {summary['requests']} requests to send ({summary['already_in_output']} records already in "
              f"{cfg.out}, {summary['cached']} cached); at most {summary['prompt_tokens_max']:,} prompt tokens "
              f"({summary['prompt_tokens_from']}) and {summary['completion_tokens_max']:,} completion tokens; "
              f"cost at most {summary['cost_max']:.4f}. Nothing was sent.")
        return 0
    print(f"{summary['records']} of {summary['total']} records in {cfg.out}: {summary['requests']} requests, "
          f"{summary['cache_hits']} cache hits, {summary['retries']} retries, {summary['errors']} errors, "
          f"spend {summary['spend']:.4f}" + (f" of budget {cfg.budget}" if cfg.budget is not None else "")
          + (f"; stopped: {summary['stopped']}" if summary["stopped"] else ""))
    return 0


def cmd_serve_teacher(a) -> int:
    import uvicorn

    from .config import ConfigError
    from .serve import load_app

    if not 0 <= a.port <= 65535:
        raise ConfigError(f"--port must be within 0-65535, got {a.port}.")
    # Listen before the model loads: a port in use or a host that is not this machine's fails at once.
    try:
        sock = socket.create_server((a.host, a.port), family=socket.AF_INET6 if ":" in a.host else socket.AF_INET)
    except OSError as e:
        raise ConfigError(f"cannot listen on --host {a.host} --port {a.port} ({e.strerror or e}): choose a free "
                          "port, or a host name or address of this machine.") from None
    with sock:
        app = load_app(a.model_dir, a.tokenizer, a.device, a.max_batch, a.model_name)
        port = sock.getsockname()[1]
        print(f"serving {a.model_dir} at http://{a.host}:{port}/v1 (model name: {app.state.model_name})", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
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

    e = sub.add_parser("export", help="a checkpoint as a Hugging Face directory, ONNX or Core ML (probed against PyTorch)")
    e.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/toy/checkpoints/step_00000050")
    e.add_argument("out_dir", help="a new (or empty) directory")
    e.add_argument("--format", default="hf", help="hf (default), onnx or coreml")
    e.add_argument("--precision", default="fp16", help="Core ML compute precision: fp16 (default) or fp32")
    e.set_defaults(fn=cmd_export)

    n = sub.add_parser("annotate", help="store response_ids + teacher_topk from a local teacher or an endpoint's "
                                        "log-probs (teacher_api_logprobs), aligned to the student's tokens")
    n.add_argument("input")
    n.add_argument("output")
    n.add_argument("--teacher", default=None,
                   help="local Hugging Face causal LM directory (default: align each record's teacher_api_logprobs)")
    n.add_argument("--teacher-tokenizer", default=None,
                   help="the teacher's tokenizer directory (default: the one saved in --teacher, else --tokenizer)")
    n.add_argument("--tokenizer", required=True, help="the student's tokenizer directory")
    n.add_argument("--k", type=int, default=None, help="row width (default: 64 for a local teacher, the "
                                                          "endpoint's K for teacher_api_logprobs)")
    n.add_argument("--temperature", type=float, default=1.0)
    n.add_argument("--batch-size", type=int, default=8)
    n.add_argument("--max-len", type=int, default=4096)
    n.add_argument("--device", default="auto")
    n.set_defaults(fn=cmd_annotate)
    g = sub.add_parser("gen-data", help="KD JSONL from prompts and a teacher behind an OpenAI-compatible endpoint")
    g.add_argument("--prompts", nargs="+", required=True, metavar="FILE", help=".jsonl (prompt or messages, "
                   "optional reference, source) or text, one prompt per line")
    g.add_argument("--out", required=True, help="the KD JSONL file (appended to; a rerun resumes it)")
    g.add_argument("--endpoint", required=True,
                   help="base URL of the chat-completions API, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", required=True)
    g.add_argument("--total", type=int, required=True, help="records to write")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=1.0,
                   help="1.0 samples the teacher's own distribution; 0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sample j of a prompt is sent with seed + j; also seeds --mix")
    g.add_argument("--system", default=None, help="a system message put before each prompt")
    g.add_argument("--samples-per-prompt", type=int, default=1)
    g.add_argument("--mix", default=None, metavar="SOURCE=RATIO,...",
                   help="draw from the prompt sources in these ratios")
    g.add_argument("--logprobs", type=int, default=0, metavar="K",
                   help="store the teacher's token log-probs and top-K alternatives (K <= 20) as teacher_api_logprobs")
    g.add_argument("--drop-truncated", action="store_true", help="drop responses cut by --max-tokens")
    g.add_argument("--budget", type=float, default=None, help="stop before spend could exceed this (currency units)")
    g.add_argument("--price-in", type=float, default=0.0, help="price per million prompt tokens")
    g.add_argument("--price-out", type=float, default=0.0, help="price per million completion tokens")
    g.add_argument("--cache-dir", default=None, help="response cache (default: .gen-data-cache beside --out)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--dry-run", action="store_true", help="print the cost upper bound and send nothing")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the teacher's tokenizer, for exact prompt token counts in --dry-run")
    g.add_argument("--max-retries", type=int, default=5, help="retries of a request on 429, 5xx, timeouts, drops")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one response")
    g.add_argument("--processes", type=int, default=None, metavar="N",
                   help="client processes that send the requests (0: this one; default: none up to 32 in flight, "
                        "else one per 32, at most one per CPU)")
    g.set_defaults(fn=cmd_gen_data)

    v = sub.add_parser("serve-teacher", help="OpenAI-compatible chat-completions server over a local HF causal LM")
    v.add_argument("model_dir", help="a local Hugging Face causal LM directory, e.g. toy/teacher")
    v.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL_DIR)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    v.add_argument("--max-batch", type=int, default=32, help="requests generated together")
    v.add_argument("--model-name", default=None, help="the name clients ask for (default: MODEL_DIR's name)")
    v.set_defaults(fn=cmd_serve_teacher)
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
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from .config import out_of_memory

        if not out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if args.command in ("train", "smoke"):
            fix = ("Lower train.micro_batch_size (a larger train.grad_accum keeps the batch), set "
                   "train.grad_checkpointing=auto or true and optimizer.state_dtype=8bit, or use more GPUs; `kdtrain "
                   "info CONFIG` estimates what a config needs.") + (
                " The last complete checkpoint, if any, resumes with --resume." if args.command == "train" else "")
        elif args.command == "annotate":
            fix = "Lower --batch-size or --max-len, or run the teacher on a device with more memory (--device)."
        else:
            fix = "Free memory on this machine or run on one with more."
        print(f"kdtrain {args.command}: error: out of memory ({first}). {fix}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
