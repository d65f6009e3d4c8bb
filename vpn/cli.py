"""Command line: python -m vpn info | train | eval | sample.

python -m vpn info --preset full
python -m vpn info --preset full --batch-size 16 --precision bf16 --activation-checkpointing --json
python -m vpn train --preset micro --data data/moving_mnist --steps 2000 --out runs/micro
python -m vpn train --preset micro --data data/moving_mnist --overfit --steps 5000
python -m vpn eval --checkpoint runs/micro/checkpoint.pt --data data/moving_mnist --split test
python -m vpn sample --checkpoint runs/micro/checkpoint.pt --data data/moving_mnist --out runs/micro/samples
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from vpn.checkpoint import load_checkpoint, load_model
from vpn.config import BLOCKS, DECODERS, DEVICE_RE, PRESETS, SEED_LIMIT, TrainConfig, VPNConfig
from vpn.evaluate import prepare, score
from vpn.overfit import overfit
from vpn.train import Trainer, resolve_device

log = logging.getLogger("vpn")
DEFAULT_PRESET = "micro"
MODEL_ARGS = ("preset", "enc_blocks", "dec_blocks", "filter_fraction", "image_channels", "output", "dilation", "block",
              "decoder")  # fmt: skip


# -- argument types: a bad value is refused by argparse, naming the argument (exit status 2) ---------
def _int_from(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            bound = f">= {low}" if high is None else f"in [{low}, {high})"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def _positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 (not nan, not inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _device(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N."""
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


_positive, _index, _seed = _int_from(1), _int_from(0), _int_from(0, SEED_LIMIT)


# -- shared arguments ---------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a preset, then any overrides)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="default: micro")
    g.add_argument("--enc-blocks", type=int)  # the model's fields: VPNConfig checks them, named
    g.add_argument("--dec-blocks", type=int)
    g.add_argument("--filter-fraction", type=float)
    g.add_argument("--image-channels", type=int, choices=(1, 3))
    g.add_argument("--output", choices=("categorical", "bernoulli"))
    g.add_argument("--dilation", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--block", choices=BLOCKS, help="residual block: rmb (the VPN's) or relu (PixelCNN's)")
    g.add_argument(
        "--decoder",
        choices=DECODERS,
        help="pixelcnn (the VPN's), baseline (no dependency within a frame) or stacks (no blind spot)",
    )


def _model_config(args: argparse.Namespace, image_channels: int | None = None) -> VPNConfig:
    overrides = {k: getattr(args, k) for k in MODEL_ARGS[1:] if getattr(args, k) is not None}
    if image_channels is not None:
        overrides.setdefault("image_channels", image_channels)
    return VPNConfig.preset(args.preset or DEFAULT_PRESET, **overrides)


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    """--set key=value (value parsed as YAML: 3e-4, true, null, 8) -> dict."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            parsed = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError):
            raise ValueError(f"--set {key.strip()}: {value!r} is not a YAML value (3e-4, true, null, 8)") from None
        if isinstance(parsed, (dict, list)):  # every TrainConfig field is a number, a string, a bool or null
            raise ValueError(f"--set {key.strip()}: takes a number, a string, true/false or null, got {value!r}")
        out[key.strip()] = parsed
    return out


def _check_resume(args: argparse.Namespace, state: dict[str, Any]) -> None:
    """--resume continues the checkpoint's own model: a model argument that would change it is refused
    (it was ignored silently), as is --overfit (a new fit of one sequence, not a resume)."""
    if args.overfit:
        raise ValueError("--resume: continues a training run; --overfit fits one sequence from scratch, drop one")
    saved = VPNConfig.from_dict(state["model_config"])
    given = {k: (getattr(args, k), f"--{k.replace('_', '-')}") for k in MODEL_ARGS[1:] if getattr(args, k) is not None}
    if args.preset is not None:  # the preset's fields, where no argument of their own overrides them
        given = {**{k: (v, f"--preset {args.preset}") for k, v in PRESETS[args.preset].items()}, **given}
    for key, (value, flag) in given.items():
        if getattr(saved, key) != value:
            raise ValueError(
                f"{flag}: the checkpoint {args.resume} holds a model with {key}={getattr(saved, key)!r}, not "
                f"{value!r}; --resume continues the checkpoint's own model: drop {flag.split()[0]}, or start a new run"
            )


def training_source(root: str, data: str, seed: int):
    from vpn.data import training_source

    return training_source(root, data, seed)


def _dataset(root: str, split: str):
    from vpn.data import MovingMNIST

    return MovingMNIST(root, split)


# -- commands -----------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    names = list(PRESETS) if args.all else [args.preset or DEFAULT_PRESET]
    rows = []
    for name in names:
        if args.all:  # every preset's depth and width, with the other options as given
            args.preset = name
            args.enc_blocks = args.dec_blocks = args.filter_fraction = None
        cfg = _model_config(args)
        from vpn.model import VideoPixelNetwork

        model = VideoPixelNetwork(cfg)
        rows.append(
            {
                "preset": cfg.matching_preset() or "custom",
                "enc_blocks": cfg.enc_blocks,
                "dec_blocks": cfg.dec_blocks,
                "filter_fraction": cfg.filter_fraction,
                "mu_channels": cfg.mu_channels,
                "residual_channels": cfg.residual_channels,
                "lstm_channels": cfg.lstm_channels,
                "image_channels": cfg.image_channels,
                "output": cfg.output,
                "block": cfg.block,
                "decoder": cfg.decoder,
                "dilation": cfg.dilation,
                "parameters": model.num_parameters(),
                f"gflops_per_frame_{args.height}x{args.width}": round(
                    model.flops_per_frame(args.height, args.width) / 1e9, 3
                ),
                **_train_memory(cfg, args),
            }
        )
    if args.json:
        print(json.dumps(rows if args.all else rows[0], indent=2))
    else:
        for row in rows:
            print("\n".join(f"{k:>28}: {v}" for k, v in row.items()))
            print()
    return 0


def _train_memory(cfg: VPNConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The estimated peak memory of one training step on one device (vpn.memory), and its settings."""
    from vpn.memory import GIB, train_memory

    train = TrainConfig(
        batch_size=args.batch_size,
        activation_checkpointing=args.activation_checkpointing,
        micro_batch_size=args.micro_batch_size,
    )
    estimate = train_memory(cfg, train, (args.seq_len, args.height, args.width), args.precision)
    return {
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "precision": args.precision,
        "activation_checkpointing": args.activation_checkpointing,
        "micro_batch_size": args.micro_batch_size,
        "saved_activations_gib": round(estimate.saved_activations / GIB, 3),
        "train_memory_gib": round(estimate.total_gib, 3),
    }


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    sets = _parse_sets(args.set)
    for flag in ("steps", "batch_size", "lr", "seed", "device"):
        if getattr(args, flag) is not None:
            sets[flag] = getattr(args, flag)
    resumed = None
    if args.resume:
        state = load_checkpoint(args.resume)
        _check_resume(args, state)
        resumed = TrainConfig.from_dict(state["train_config"])
    source = {k: sets.get(k, getattr(resumed or TrainConfig(), k)) for k in ("data", "seed")}
    train_data = training_source(args.data, "fixed" if args.overfit else source["data"], source["seed"])
    image_channels = train_data[0].shape[1]
    ckpt = out / "checkpoint.pt"

    if args.overfit:
        cfg = _model_config(args, image_channels)
        tcfg = TrainConfig.from_dict({"context": 1, **sets})
        if args.index >= len(train_data):
            raise ValueError(f"--index: {args.index}, but {args.data} has {len(train_data)} training sequences")
        sequence = train_data[args.index]
        result = overfit(cfg, tcfg, sequence, tol=args.tol)
        summary = {
            "preset": cfg.matching_preset() or "custom",
            "converged_step": result.converged_step,
            "floor_nats_per_frame": result.floor,
            "tol_nats_per_frame": result.tol,
            "first_nats_per_frame": result.losses[0],
            "last_nats_per_frame": result.losses[-1],
            "steps_run": len(result.losses),
        }
        _write_json(out / "overfit.json", {**summary, "losses": result.losses})
        if result.converged_step is None:
            print(f"did not converge within {len(result.losses)} steps: {json.dumps(summary)}")
            return 1
        print(f"converged at iteration {result.converged_step}: {json.dumps(summary)}")
        return 0

    val_data = _dataset(args.data, "val")
    if args.resume:
        trainer = Trainer.from_checkpoint(args.resume, train_data, val_data, **sets)
        log.info("resumed from %s at step %d", args.resume, trainer.step)
    else:
        cfg = _model_config(args, image_channels)
        trainer = Trainer(cfg, TrainConfig.from_dict(sets), train_data, val_data)
    metrics_path = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    last = trainer.fit(on_log=on_log, on_checkpoint=lambda step: trainer.save(ckpt), progress=not args.quiet)
    print(json.dumps({"step": trainer.step, "checkpoint": str(ckpt), **last}))
    return 0


EVAL_METRICS = ("nll", "mse", "mae", "ssim", "psnr")


def _eval_metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in EVAL_METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown {unknown or text!r}; choose from {','.join(EVAL_METRICS)}")
    return names


def cmd_eval(args: argparse.Namespace) -> int:
    from vpn.forecast import forecast

    metrics = _eval_metrics(args.metrics)
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)
    tcfg = TrainConfig.from_dict(state["train_config"])
    if args.context is not None:
        try:
            tcfg = dataclasses.replace(tcfg, context=args.context)
        except ValueError as e:  # context=n must be < seq_len=m, the checkpoint's
            raise ValueError(f"--context: {e} (the checkpoint's train.seq_len)") from None
    model = load_model(args.checkpoint, device)
    data = _dataset(args.data, args.split)
    frames = min(tcfg.seq_len or data.seq_len, data.seq_len)
    if tcfg.context >= frames:
        raise ValueError(f"--context: {tcfg.context} frames given leave none to score of the {frames} frames scored")
    out: dict[str, Any] = {"split": args.split, "context": tcfg.context}
    if "nll" in metrics:
        result = score(model, data, tcfg, args.limit, batch_size=args.batch_size)
        out.update(sequences=result.sequences, nats_per_frame=result.nats_per_frame)
        if result.floor_nats_per_frame is not None:
            out["lower_bound_nats_per_frame"] = result.floor_nats_per_frame
            out["excess_nats_per_frame"] = result.excess_nats_per_frame
    frame_metrics = [m for m in metrics if m != "nll"]
    if frame_metrics:
        fc = forecast(
            model, data, tcfg, args.limit, samples=args.samples, temperature=args.temperature,
            seed=args.seed, batch_size=args.batch_size,
        )  # fmt: skip
        out.update(forecast_sequences=fc.sequences, samples=fc.samples, temperature=fc.temperature)
        for m in frame_metrics:
            out.update({m: fc.mean[m], f"{m}_best": fc.best[m], f"{m}_mean_frame": fc.mean_frame[m]})
            out[f"{m}_by_frame"] = list(fc.per_frame[m])
    print(json.dumps(out))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from vpn.viz import enlarge, save_gif, save_png, strip

    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)
    tcfg = TrainConfig.from_dict(state["train_config"])
    model = load_model(args.checkpoint, device)
    data = _dataset(args.data, args.split)
    if args.index + args.batch > len(data):
        raise ValueError(
            f"--index {args.index} --batch {args.batch}: asks for sequences up to {args.index + args.batch - 1}, but "
            f"split {args.split} of {args.data} has {len(data)}"
        )
    truth = prepare(torch.stack([data[args.index + b] for b in range(args.batch)]), tcfg)  # (B, T, C, H, W)
    if not 1 <= args.context < truth.shape[1] + 1:
        raise ValueError(f"--context must be in [1, {truth.shape[1]}]")
    context = truth[:, : args.context].to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    k = args.samples
    given = context.repeat_interleave(k, dim=0)  # (B*k, context, C, H, W): k draws per sequence
    video = model.sample(given, args.frames, generator=generator, temperature=args.temperature, method=args.method)
    video = video.cpu().unflatten(0, (args.batch, k))  # (B, k, frames, C, H, W)
    out = Path(args.out)
    rows = []  # per sequence: the ground truth, then each of the k samples after the same context
    for b in range(args.batch):
        rows.append(truth[b, : args.context + args.frames])
        rows.extend(torch.cat([truth[b, : args.context], video[b, j]]) for j in range(k))
    if k == 1:
        video = video[:, 0]  # sample.pt keeps its (B, frames, C, H, W) shape for one sample
    # Nearest-neighbour enlargement to >= MIN_FRAME_PX a frame, so that 16x16 frames can be seen.
    save_png(enlarge(strip(rows, separator_at=args.context), truth.shape[-2]), out / "sample.png")
    save_gif(rows, out / "sample.gif")
    torch.save(video, out / ".sample.pt.tmp")
    (out / ".sample.pt.tmp").replace(out / "sample.pt")
    print(json.dumps({"png": str(out / "sample.png"), "gif": str(out / "sample.gif"), "frames": list(video.shape)}))
    return 0


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vpn", description="Video Pixel Networks")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="block counts, widths, parameters and FLOPs per frame")
    _add_model_args(p)
    p.add_argument("--all", action="store_true", help="every preset")
    p.add_argument("--height", type=_positive, default=64)
    p.add_argument("--width", type=_positive, default=64)
    g = p.add_argument_group("training memory (vpn.memory: one step on one device, estimated on the meta device)")
    g.add_argument(
        "--batch-size", type=_positive, default=TrainConfig.batch_size, help="sequences per step on the device"
    )
    g.add_argument("--seq-len", type=_int_from(2), default=20, help="frames per sequence")
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, as on CUDA")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each residual block")
    g.add_argument("--micro-batch-size", type=_positive, help="sequences per forward pass (gradient accumulation)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train on a Moving MNIST folder (or overfit one sequence)")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="folder with train.npy / val.npy (the generate stage's output)")
    p.add_argument("--out", default="runs/latest", help="checkpoint.pt and metrics.jsonl go here")
    p.add_argument("--steps", type=_positive)
    p.add_argument("--batch-size", type=_positive)
    p.add_argument("--lr", type=_positive_number)
    p.add_argument("--seed", type=_seed)
    p.add_argument("--device", type=_device)
    p.add_argument("--resume", help="checkpoint to continue from (its configs are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    p.add_argument("--overfit", action="store_true", help="the blog post's experiment: fit one sequence")
    p.add_argument("--index", type=_index, default=0, help="--overfit: which training sequence")
    p.add_argument("--tol", type=_positive_number, help="--overfit: nats/frame above the floor that count as converged")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="NLL in nats/frame, and free-running MSE/MAE/SSIM/PSNR, on a split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--context", type=_positive, help="frames given (default: the checkpoint's train.context)")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--limit", type=_positive, help="score only the first N sequences")
    p.add_argument(
        "--metrics", default="nll", help=f"comma-separated, of {','.join(EVAL_METRICS)} (frame metrics: vpn.forecast)"
    )
    p.add_argument("--samples", type=_positive, default=10, help="k free-running samples per sequence (frame metrics)")
    p.add_argument("--temperature", type=_positive_number, default=1.0)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", type=_device, default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="sample frames after a context; writes sample.png and sample.gif")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--index", type=_index, default=0)
    p.add_argument("--batch", type=_positive, default=1, help="sequences index..index+batch-1")
    p.add_argument("--context", type=_positive, default=10)
    p.add_argument("--frames", type=_positive, default=10)
    p.add_argument("--samples", type=_positive, default=1, help="k samples per sequence, one row each under its truth")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--temperature", type=_positive_number, default=1.0)
    p.add_argument("--method", choices=("cached", "naive"), default="cached")
    p.add_argument("--out", default="runs/latest/samples")
    p.add_argument("--device", type=_device, default="auto")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the argument at fault (status 2), or --help
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
