"""``leanopt demo``: train a small byte-level GPT under standard mixed precision and leanopt's modes.

Each configuration runs in a fresh Python process (:mod:`leanopt.cli.worker`) so that its peak
memory is its own. The demo prints a table of bytes per parameter (from :func:`leanopt.memory_report`),
measured peak memory, median step time and final losses, each as a ratio against standard mixed
precision, and writes ``demo.json`` (every figure) and ``demo.png`` (loss curves, memory bars).
Configurations that need parts of leanopt that are not installed (gradient release, compact master,
int8/int4 states) are left out automatically.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import (
    CLIError,
    Features,
    ProgressBar,
    busy_note,
    detect_features,
    format_count,
    jsonable,
    loadavg,
    ratio,
    table,
)
from .plan import Mode, check_mode

EXAMPLES = """\
examples:
  leanopt demo                       # a few minutes on a 2-core CPU; uses CUDA when present
  leanopt demo --quick               # under a minute: smaller model, fewer steps
  leanopt demo --steps 500 --out runs/demo
  leanopt demo --configs standard,exact/fp32,exact/bf16
  leanopt demo --list-configs        # what this installation can run
"""

#: model presets (leanopt.models.GPTConfig fields); the byte-level GPT of the quality benchmark and a wider one
MODELS: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 256, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128},
    "small": {"vocab_size": 256, "block_size": 128, "n_layer": 6, "n_head": 6, "n_embd": 384},
}
DEFAULT_OUT = "leanopt-demo"
#: steps per configuration: the default run takes a few minutes on a 2-core CPU, --quick under one
DEFAULT_STEPS, QUICK_STEPS = 80, 30


@dataclass(frozen=True)
class DemoConfig:
    """One training run of the demo."""

    name: str
    label: str
    kind: str  # "standard" or "leanopt"
    master: str = ""
    states: str = ""
    release: bool = False


STANDARD = DemoConfig("standard", "standard mixed precision (fp32 weights, bf16 autocast, fused AdamW)", "standard")


def leanopt_config(mode: Mode) -> DemoConfig:
    label = f"leanopt {mode.master} bf16 weights, {mode.states} states" + (
        " + gradient release" if mode.release else ""
    )
    return DemoConfig(mode.name, label, "leanopt", mode.master, mode.states, mode.release)


def available_configs(features: Features) -> tuple[list[DemoConfig], list[DemoConfig]]:
    """(default configurations, every configuration this installation can run)."""
    f = features
    release = f.release
    compact8 = f.has_master("compact") and f.has_states("int8")
    modes = [Mode("exact", "fp32"), Mode("exact", "fp32", True), Mode("exact", "bf16"), Mode("exact", "bf16", True),
             Mode("compact", "int8"), Mode("compact", "int8", True), Mode("compact", "int4"),
             Mode("compact", "int4", True), Mode("stochastic", "int8", True),
             Mode("stochastic", "int4", True)]  # fmt: skip
    runnable = [m for m in modes if f.has_master(m.master) and f.has_states(m.states) and (release or not m.release)]
    default = [Mode("exact", "fp32"), Mode("exact", "fp32", True)]
    if not compact8:  # the smallest layout that exists so far
        default.append(Mode("exact", "bf16", release))
    # then the smallest: no bytes beyond the 16-bit weight (stochastic rounding), 8-bit states
    default += [Mode("compact", "int8", release), Mode("compact", "int4", True), Mode("stochastic", "int8", True)]
    default_cfgs = [STANDARD] + [leanopt_config(m) for m in dict.fromkeys(default) if m in runnable]
    return default_cfgs, [STANDARD] + [leanopt_config(m) for m in runnable]


def select_configs(spec: str | None, features: Features) -> list[DemoConfig]:
    """Configurations named in ``--configs`` (``all``, or a comma list of names), checked."""
    default, every = available_configs(features)
    if spec is None:
        return default
    if spec.strip() == "all":
        return every
    chosen = []
    for name in (t.strip() for t in spec.split(",")):
        if not name:
            continue
        if name == "standard":
            chosen.append(STANDARD)
            continue
        mode = Mode.parse(name)
        check_mode(mode, features)
        chosen.append(leanopt_config(mode))
    if not chosen:
        raise CLIError("--configs is empty; see --list-configs")
    if chosen[0].name != "standard":
        chosen.insert(0, STANDARD)  # the ratios need the baseline
    return list(dict.fromkeys(chosen))


def build_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="train a small GPT under standard mixed precision and leanopt modes; compare memory, speed, loss",
        description=__doc__.split("\n\n")[0] + " Each configuration runs in its own process.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"tiny model, {QUICK_STEPS} steps: under a minute on a CPU")
    p.add_argument(
        "--steps", type=int, help=f"training steps per configuration (default {DEFAULT_STEPS}; --quick {QUICK_STEPS})"
    )
    p.add_argument("--model", choices=sorted(MODELS), help="model size (default small, 10.8M params; --quick tiny)")
    p.add_argument("--batch", type=int, default=8, help="sequences of 128 bytes per step (default 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", help="'all' or a comma list, e.g. standard,exact/fp32,exact/fp32+release")
    p.add_argument("--list-configs", action="store_true", help="print the configurations available and exit")
    p.add_argument("--device", default="auto", help="auto (default: cuda when present), cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads per run (default: torch's choice)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------ running


def run_config(config: DemoConfig, settings: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Train ``config`` in a fresh process, drawing a progress bar; returns the worker's figures."""
    cfg_path, res_path = (
        workdir / f"{config.name.replace('/', '_')}.config.json",
        workdir / f"{config.name.replace('/', '_')}.result.json",
    )
    cfg_path.write_text(json.dumps({**asdict(config), **settings}))
    bar = ProgressBar(f"{config.name:<22}", settings["steps"])
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "leanopt.cli.worker", str(cfg_path), str(res_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    err_path = workdir / f"{config.name.replace('/', '_')}.stderr.txt"
    with open(err_path, "w") as err_file:  # a file, not a pipe: a chatty worker cannot block on it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
        assert proc.stdout is not None
        note = ""
        try:
            for line in proc.stdout:
                if line.startswith("@progress "):
                    _, step, _total, loss, ms = line.split()
                    note = f"loss {float(loss):.3f}  {float(ms):.0f} ms/step"
                    bar.update(int(step), note)
                else:
                    print(line, end="", file=sys.stderr)
        except BaseException:  # interrupted (Ctrl-C): stop the worker too
            proc.kill()
            proc.wait()
            raise
        code = proc.wait()
    bar.close(note)
    err = err_path.read_text(errors="replace")
    if code != 0 or not res_path.exists():
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {code}"
        return {"name": config.name, "error": reason, "stderr": err[-4000:]}
    return {**json.loads(res_path.read_text()), "wall_s": time.perf_counter() - started}  # process start to end


def _grouped(by_cat: dict[str, int]) -> dict[str, int]:
    fixed = ("weights", "master", "gradients", "other")
    return {
        "weights": by_cat.get("weights", 0),
        "master": by_cat.get("master", 0),
        "gradients": by_cat.get("gradients", 0),
        "states": sum(v for k, v in by_cat.items() if k not in fixed),
        "other": by_cat.get("other", 0),
    }


def summarize(results: list[dict[str, Any]], cuda: bool) -> tuple[str, list[dict[str, Any]]]:
    """The printed table and, per run, the ratios against the standard run."""
    base = next((r for r in results if r["name"] == "standard" and "error" not in r), None)
    peak_key = "cuda_peak_allocated_bytes" if cuda else "peak_rss_above_start_bytes"
    rows1, rows2, ratios = [], [], []
    for r in results:
        if "error" in r:
            rows1.append([r["name"], "failed: " + r["error"][:80], "", "", "", "", ""])
            ratios.append({})
            continue
        n = r["num_params"]
        g = {k: v / n for k, v in _grouped(r["bytes_by_category"]).items()}
        total = r["bytes_per_param"]
        rat = {}
        if base is not None:
            rat = {
                "bytes_per_param": total / base["bytes_per_param"],
                "peak_memory": r[peak_key] / base[peak_key] if base[peak_key] else None,
                "median_step_time": r["median_step_s"] / base["median_step_s"],
                "final_train_loss": r["final_train_loss"] / base["final_train_loss"],
                "val_loss": r["val_loss"] / base["val_loss"],
            }
        ratios.append(rat)
        b = base or r
        rows1.append(
            [
                r["name"],
                f"{g['weights']:.2f}",
                f"{g['master']:.2f}",
                f"{g['gradients']:.2f}",
                f"{g['states'] + g['other']:.2f}",
                f"{total:.2f}",
                ratio(total, b["bytes_per_param"]),
            ]
        )
        rows2.append([r["name"], f"{r[peak_key] / 2**20:.0f}", ratio(r[peak_key], b[peak_key]),
                      f"{1e3 * r['median_step_s']:.0f}", ratio(r["median_step_s"], b["median_step_s"]),
                      f"{r['final_train_loss']:.3f}", ratio(r["final_train_loss"], b["final_train_loss"]),
                      f"{r['val_loss']:.3f}", ratio(r["val_loss"], b["val_loss"])])  # fmt: skip
    peak_name = "CUDA peak MiB" if cuda else "peak RSS MiB"
    text = "\n".join([
        "bytes per parameter (leanopt.memory_report: weights + master bits + gradients + optimizer states)",
        table(rows1, ["config", "weights", "master", "grads", "states", "total", "vs std"]),
        "",
        "measured (ratio vs standard)" + ("" if cuda else "; peak RSS above the worker's RSS before its model"),
        table(rows2, ["config", peak_name, "ratio", "step ms", "ratio", "train loss", "ratio", "val loss", "ratio"]),
    ])  # fmt: skip
    return text, ratios


def plot(results: list[dict[str, Any]], configs: list[DemoConfig], path: Path, title: str, cuda: bool) -> str | None:
    """Write the PNG (loss curves + stacked bytes/param bars). Returns a message if it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no PNG was written: pip install 'leanopt[demo]' (or matplotlib)"
    ok = [r for r in results if "error" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    for i, r in enumerate(ok):
        losses = r["train_losses"]
        smooth, ema = [], 0.0
        for t, v in enumerate(losses, 1):  # bias-corrected EMA, as Adam's moments
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema / (1 - 0.9**t))
        color = f"C{i}"
        ax1.plot(range(1, len(losses) + 1), losses, color=color, alpha=0.15, linewidth=0.8)
        ax1.plot(range(1, len(smooth) + 1), smooth, color=color, label=f"{r['name']} (val {r['val_loss']:.3f})")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss (nats per byte; EMA 0.9, raw faint)")
    ax1.set_title("training loss")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    cats = ["weights", "master", "gradients", "states", "other"]
    names = [r["name"] for r in ok]
    bottoms = [0.0] * len(ok)
    base = next((r for r in ok if r["name"] == "standard"), None)
    peak_key = "cuda_peak_allocated_bytes" if cuda else "peak_rss_above_start_bytes"
    for j, cat in enumerate(cats):
        vals = [_grouped(r["bytes_by_category"])[cat] / r["num_params"] for r in ok]
        ax2.bar(names, vals, bottom=bottoms, label=cat, color=f"C{j}", alpha=0.8)
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    for k, r in enumerate(ok):
        note = f"{bottoms[k]:.2f} B/param"
        if base and base[peak_key]:
            note += f"\npeak x{r[peak_key] / base[peak_key]:.2f}"
        ax2.text(k, bottoms[k] + 0.2, note, ha="center", va="bottom", fontsize=8)
    ax2.set_ylim(0, max(bottoms) * 1.25)
    ax2.set_ylabel("bytes per parameter")
    ax2.set_title("memory per parameter (peak: measured, vs standard)")
    ax2.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run(args: argparse.Namespace) -> int:
    """Entry point of ``leanopt demo``."""
    import torch

    from .bench import resolve_device

    features = detect_features()
    if args.list_configs:
        default, every = available_configs(features)
        for c in every:
            print(f"{c.name:<22} {'(default) ' if c in default else ''}{c.label}")
        return 0
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if steps < 2:
        raise CLIError(f"--steps must be at least 2, got {steps}")
    if args.batch < 1:
        raise CLIError(f"--batch must be at least 1, got {args.batch}")
    if not (args.lr > 0 and args.lr < 1):
        raise CLIError(f"--lr must be in (0, 1), got {args.lr}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    device = resolve_device(args.device)
    configs = select_configs(args.configs, features)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {args.out!r}: cannot create the folder ({err.strerror})") from None
    model_name = args.model or ("tiny" if args.quick else "small")
    settings = {
        "model": MODELS[model_name], "steps": steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "device": str(device), "threads": args.threads, "eval_batches": 4 if args.quick else 8,
        "corpus_bytes": 2_000_000,
    }  # fmt: skip
    from ..models import GPT, GPTConfig

    with torch.device("meta"):
        n = GPT(GPTConfig(**MODELS[model_name])).num_params()
    cuda = device.type == "cuda"
    print(
        f"leanopt demo: byte-level GPT '{model_name}' ({format_count(n)} parameters), {steps} steps of "
        f"{args.batch}x128 bytes from the Python standard library's sources, on {device}",
        flush=True,
    )
    print(f"{len(configs)} configurations, each in a fresh process; output in {out}/\n", flush=True)
    load_start, busy = loadavg(), busy_note()
    if busy:
        print(busy + "\n", flush=True)
    results, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="leanopt-demo-") as tmp:
        for config in configs:
            results.append(run_config(config, settings, Path(tmp)))
    text, ratios = summarize(results, cuda)
    print("\n" + text)
    doc = {
        "command": " ".join(["leanopt", *getattr(args, "argv", ["demo"])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**settings, "model_name": model_name, "num_params": n},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name(device) if cuda else None,
                    "loadavg_start": load_start, "loadavg_end": loadavg()},
        "peak_memory_measure": "cuda max_memory_allocated" if cuda else "peak RSS (VmHWM) minus RSS before model",
        "wall_s": time.perf_counter() - started,
        "runs": [
            {**asdict(c), **r, "ratios_vs_standard": rat} for c, r, rat in zip(configs, results, ratios, strict=True)
        ],
    }  # fmt: skip
    (out / "demo.json").write_text(json.dumps(jsonable(doc), indent=1))
    written = [str(out / "demo.json")]
    if not args.no_plot:
        title = (
            f"leanopt demo: {format_count(n)}-parameter byte-level GPT, {steps} steps, {device} "
            f"({platform.machine()}, torch {torch.__version__})"
        )
        skipped = plot(results, configs, out / "demo.png", title, cuda)
        if skipped:
            print(f"note: {skipped}", file=sys.stderr)
        else:
            written.append(str(out / "demo.png"))
    print(f"\nwrote {' and '.join(written)} ({doc['wall_s']:.0f} s)")
    failed = [r["name"] for r in results if "error" in r]
    if failed:
        print(
            f"leanopt demo: error: {len(failed)} run(s) failed: {', '.join(failed)} (details in demo.json)",
            file=sys.stderr,
        )
        return 1
    return 0
