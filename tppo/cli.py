"""The ``tppo`` command: train | sft | eval | plot | demo.

    tppo train --config FILE [--run-dir DIR] [--resume DIR | --overwrite] [--dry-run] [key=value ...]
    tppo sft   [--config FILE] [key=value ...]
    tppo eval  --model PATH [--config FILE] [key=value ...]
    tppo config [--config FILE] [key=value ...]     (the resolved config, each field documented)
    tppo convert SOURCE OUT_DIR [--gguf-file F] [--revision R] [--dtype D]
    tppo plot  RUN_DIR [RUN_DIR ...] [--out FILE]
    tppo report RUN_DIR [--out FILE]                (partial trajectories, EGAE truncation diagnostic)
    tppo demo  [--config FILE] [--overwrite] [key=value ...]  (SFT if needed, T-PPO, plots)

Options and ``key=value`` overrides may come in any order. Exit codes: 0 done, 1 a run
that stopped (diverged, a checkpoint not written), 2 bad input (nothing ran), 128 + N
after signal N (130 for Ctrl-C) once the checkpoint that resumes the run is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tppo", description="Truncated PPO for reasoning language models")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="RL training (T-PPO or PPO)")
    t.add_argument("--config", help="YAML config (default: built-in defaults)")
    t.add_argument("--run-dir", help="run directory (overrides log.run_dir)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start again in a run directory that holds a run (its checkpoints and metrics are removed first)")
    t.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) malformed dataset rows instead of stopping")
    t.add_argument("--dry-run", action="store_true", help="check the config, data, reward and model path, say what would run, "
                                                          "and exit without loading weights or writing anything")
    for name, help_ in (("sft", "supervised warm-start of the embedded model"), ("demo", "SFT (cached) + T-PPO + plots")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", default=str(DEMO_CONFIG) if name == "demo" else None)
    sub.choices["demo"].add_argument("--overwrite", action="store_true", help="train the demo again (default: continue or show the run in log.run_dir)")
    cf = sub.add_parser("config", help="print the resolved config (YAML), each field with its documentation")
    cf.add_argument("--config", help="YAML config (default: built-in defaults)")
    e = sub.add_parser("eval", help="held-out avg@k / pass@k of a checkpoint")
    e.add_argument("--config", help="default: the run's config.yaml when --model is a run's checkpoint, else the defaults")
    e.add_argument("--model", required=True, help="policy checkpoint: a directory, a hub id or a .gguf file")
    c = sub.add_parser("convert", help="a GGUF file or hub model to a plain Hugging Face directory (safetensors)")
    c.add_argument("source", help="a .gguf file, a directory (with --gguf-file) or a hub id")
    c.add_argument("out", help="output directory")
    c.add_argument("--gguf-file", help="GGUF file name inside SOURCE")
    c.add_argument("--revision", help="hub revision of SOURCE")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    x = sub.add_parser("export", help="a checkpoint's policy as a plain Hugging Face directory (LoRA adapters merged)")
    x.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-N (or its policy/)")
    x.add_argument("out", help="output directory")
    x.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the run's model.dtype")
    rp = sub.add_parser("report", help="PNG panels of one run's partial trajectories and EGAE truncation diagnostic")
    rp.add_argument("run")
    rp.add_argument("--out", help="output PNG (default: RUN_DIR/report.png)")
    pl = sub.add_parser("plot", help="PNG plots of runs, overlaid")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", help="output PNG (default: FIRST_RUN/plots.png)")
    for s in (t, sub.choices["sft"], sub.choices["demo"], e, cf):
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with options and overrides in any order (``tppo train a=1
    --run-dir D b=2``): the subcommand's own parser reads its arguments intermixed
    (argparse allows that for a parser without subparsers)."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # help, or argparse's own message for an unknown command
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.cmd = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    from tppo.config import ConfigError
    from tppo.stopping import Interrupted
    from tppo.tasks import DatasetError
    from tppo.trainer import CheckpointError, TrainingDiverged

    hf_logging.disable_progress_bar()  # weight loading/saving bars would drown the step lines

    try:
        commands = {"train": cmd_train, "sft": cmd_sft, "eval": cmd_eval, "config": cmd_config, "convert": cmd_convert,
                    "export": cmd_export, "report": cmd_report, "plot": cmd_plot, "demo": cmd_demo}
        return commands[args.cmd](args)
    except (ConfigError, DatasetError, FileNotFoundError, ImportError) as e:  # bad input or a missing extra: nothing ran
        print(f"tppo {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointError) as e:  # a run that stopped; its last checkpoint is resumable
        print(f"tppo {args.cmd}: stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # Ctrl-C or SIGTERM: the checkpoint is written
        print(f"tppo {args.cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `tppo config | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:  # before the training loop (loading, SFT): nothing to save yet
        print(f"\ntppo {args.cmd}: interrupted before the first training step; nothing was saved", file=sys.stderr)
        return 130


def cmd_train(args) -> int:
    from tppo.config import ConfigError, load_config
    from tppo.trainer import resume_config

    overrides = list(args.overrides) + (["task.skip_bad_rows=true"] if args.skip_bad_rows else [])
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it again: give one of them")
    if args.resume:
        # overrides without --config apply to the run's own saved config
        requested = load_config(args.config or Path(args.resume) / "config.yaml", overrides) if (args.config or overrides) else None
        cfg = resume_config(args.resume, requested)
        run_dir = args.resume
    else:
        cfg = load_config(args.config, overrides)
        run_dir = args.run_dir or cfg.log.run_dir
    if args.dry_run:
        from tppo.dryrun import dry_run

        print("\n".join(dry_run(cfg, run_dir, resume=bool(args.resume))))
        return 0
    _train_and_report(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    return 0


def _train_and_report(cfg, run_dir, resume: bool, overwrite: bool = False) -> None:
    from tppo.stopping import Interrupted
    from tppo.trainer import Trainer

    from tppo import distributed

    try:
        trainer = Trainer(cfg, run_dir, resume=resume, overwrite=overwrite)
        trainer.train()
    except Interrupted as e:
        rank = distributed.rank()
        distributed.shutdown(synchronize=False)
        if rank == 0:
            raise
        sys.exit(e.exit_code)  # rank 0 says it once
    except RuntimeError as e:
        from tppo.trainer import TrainingDiverged

        if not distributed.active() or isinstance(e, TrainingDiverged):
            raise
        # gloo/NCCL report a dead peer as a closed connection or a timeout: say what it means
        print(f"tppo train: rank {distributed.rank()} of {distributed.world_size()}: a collective failed ({str(e).splitlines()[0]}); "
              f"another rank probably died (see its log) or took longer than train.dist_timeout_s", file=sys.stderr)
        sys.exit(1)
    distributed.shutdown()
    if trainer.rank != 0:  # rank 0 reports
        return
    _report(cfg, run_dir)


def _report(cfg, run_dir) -> None:
    """The run's accuracy before and after RL, from its files (a resumed or finished run too)."""
    import json

    from tppo.metrics import read_metrics
    from tppo.plots import plot_runs

    run_dir = Path(run_dir)
    plot = plot_runs([run_dir], run_dir / "plots.png")
    initial = run_dir / "eval_initial.json"
    before = json.loads(initial.read_text()) if initial.exists() else {}
    after = next((m for m in reversed(read_metrics(run_dir)) if m.get("eval/accuracy") is not None), {})
    if before.get("eval/accuracy") is not None and after:
        gain = after["eval/accuracy"] - before["eval/accuracy"]
        print(f"held-out accuracy (avg@{cfg.log.eval_samples}): before RL {_with_se(before)} -> after RL {_with_se(after)} "
              f"({100 * gain:+.1f} points)")
    print(f"metrics: {run_dir / 'metrics.jsonl'}\nplots:   {plot}")


def _with_se(m: dict) -> str:
    """``eval/accuracy`` with its standard error when the run logged one (runs before
    ``eval/accuracy_se`` existed did not)."""
    se = m.get("eval/accuracy_se")
    return f"{m['eval/accuracy']:.3f}" + (f" (SE {se:.3f})" if se is not None and se == se else "")


def cmd_sft(args) -> int:
    from tppo.config import load_config
    from tppo.sft import run_sft

    cfg = load_config(args.config, list(args.overrides))
    out = run_sft(cfg)
    print(f"saved SFT model to {out}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from tppo.evaluation import avg_at_k_se, evaluate, run_generate_fn
    from tppo.export import is_adapter, load_policy
    from tppo.models import ModelSource, eos_token_ids, load_pretrained
    from tppo.rewards import RewardScorer
    from tppo.trainer import eval_examples, resolve_device

    cfg, config_file = eval_config(args)
    print(f"config: {config_file or 'the defaults'}; model: {cfg.model.path}" + (f" ({cfg.model.gguf_file})" if cfg.model.gguf_file else ""))
    device = resolve_device(cfg.train.device)
    path = Path(cfg.model.path)
    if path.is_dir() and ((path / "policy").is_dir() or is_adapter(path)):  # a run's checkpoint (LoRA: merged into its base)
        model, tok = load_policy(cfg.model.path, dtype=getattr(torch, cfg.model.dtype))
    else:
        model, tok = load_pretrained(ModelSource.of(cfg.model.path, cfg.model.gguf_file, cfg.model.revision), dtype=getattr(torch, cfg.model.dtype))
    model.to(device)
    examples, notes = eval_examples(cfg)
    for note in notes:
        print(note)
    k = cfg.log.eval_samples
    with RewardScorer.from_task(cfg.task) as scorer:
        res = evaluate(examples, run_generate_fn(cfg, model, tok, eos_token_ids(tok, model), device), scorer, samples=k, ks=(1, k))
    print(f"{len(examples)} problems x {k} samples: avg@{k} {res.avg_at_k:.4f} (SE {avg_at_k_se(res.correct):.4f})  pass@1 {res.pass_at_k[1]:.4f}  pass@{k} {res.pass_at_k[k]:.4f}")
    return 0


def eval_config(args):
    """(config, its file) for ``tppo eval``: --config, else the run's own config when --model
    lies in a run's checkpoints (RUN/checkpoints/step-N/policy), else the defaults; with
    model.path set to --model. The config's GGUF file name and revision are kept only where
    they describe --model (its directory holds that file; a hub id)."""
    import json

    from tppo.config import load_config

    model = Path(args.model)
    run = next((p.parent for p in model.resolve().parents if p.name == "checkpoints" and (p.parent / "config.yaml").exists()), None)
    config_file = args.config or (str(run / "config.yaml") if run else None)
    cfg = load_config(config_file, [*args.overrides, f"model.path={json.dumps(args.model)}"])
    if model.exists():
        cfg.model.revision = None
        if cfg.model.gguf_file and not (model / cfg.model.gguf_file).is_file():
            cfg.model.gguf_file = None
    return cfg, config_file


def cmd_config(args) -> int:
    from tppo.config import describe, load_config

    cfg = load_config(args.config, list(args.overrides))
    print(f"# tppo config{' --config ' + args.config if args.config else ''}{''.join(' ' + o for o in args.overrides)}")
    for note in cfg.notes:
        print(f"# note: {note}")
    print(describe(cfg))
    return 0


def cmd_convert(args) -> int:
    import torch

    from tppo.models import ModelSource, load_pretrained, save_pretrained

    model, tok = load_pretrained(ModelSource.of(args.source, args.gguf_file, args.revision), dtype=getattr(torch, args.dtype))
    save_pretrained(model, tok, args.out)
    print(f"saved {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.dtype}) to {args.out}")
    return 0


def cmd_export(args) -> int:
    import torch

    from tppo.export import export_checkpoint

    model, out = export_checkpoint(args.checkpoint, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"saved {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}) to {out}")
    return 0


def cmd_plot(args) -> int:
    from tppo.plots import plot_runs

    out = plot_runs(args.runs, args.out or Path(args.runs[0]) / "plots.png")
    print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    from tppo.plots import plot_report

    if not (Path(args.run) / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{args.run} has no metrics.jsonl: not a run directory")
    print(f"wrote {plot_report(args.run, args.out or Path(args.run) / 'report.png')}")
    return 0


def cmd_demo(args) -> int:
    from tppo.checkpoint import latest_checkpoint
    from tppo.config import ConfigError, load_config
    from tppo.trainer import resume_config

    cfg = load_config(args.config, list(args.overrides))
    run_dir = cfg.log.run_dir
    resume = not args.overwrite and latest_checkpoint(run_dir) is not None
    if resume:  # run twice, the demo continues its run (or shows it, when finished)
        try:
            cfg = resume_config(run_dir, cfg)
        except ConfigError as e:
            raise ConfigError(f"{e}; `tppo demo --overwrite` trains the demo again from the start") from None
        print(f"{run_dir} holds the demo's run: continuing it (`tppo demo --overwrite` trains it again from the start)")
    _train_and_report(cfg, run_dir, resume=resume, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
