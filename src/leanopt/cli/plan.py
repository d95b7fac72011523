"""``leanopt plan``: how much memory a model's weights, gradients and optimizer states take, per mode.

leanopt's own rows are derived from the formats themselves: the optimizer is built over parameters on
the ``meta`` device (no memory is allocated) and the dtypes and shapes of the state it would hold are
read back, so a new weight or state format is covered without touching this file. The result equals
what :func:`leanopt.memory_report` measures after a real step (``tests/test_cli_plan.py`` checks this).
Activations, autocast caches and framework overhead are not included.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..memory import ByteTotals
from .common import CLIError, Features, detect_features, format_bytes, format_count, jsonable, parse_bytes, parse_count

Shape = tuple[int, ...]

EXAMPLES = """\
examples:
  leanopt plan 124M                          # a parameter count (K, M, B, T suffixes or 1.3e9)
  leanopt plan 7B --memory 24GB              # what fits in 24 GB (10^9 bytes; 24GiB for 2^30)
  leanopt plan 7B --shards 8 --memory 80GB   # per GPU when FSDP2 shards it over 8 ranks
  leanopt plan path/to/config.json           # a Hugging Face config (GPT-2 and Llama-style models)
  leanopt plan gpt2-small --optimizer lion   # a built-in model: gpt2-small, tiny-bytes
  leanopt plan mypkg.models:build_model      # a Python factory, built on the meta device
  leanopt plan 1.3e9 --modes exact/bf16+release,exact/fp32 --json
"""

#: optimizer name -> (leanopt class name, hyper-parameters used for the plan)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("AdamW", {}),
    "adam": ("Adam", {}),
    "sgd": ("SGD", {"momentum": 0.9}),
    "lion": ("Lion", {}),
}
#: torch.optim's state layout for the standard recipe (fp32 weights and gradients), per optimizer:
#: (per-element fp32 states, whether each tensor has a 4-byte fp32 ``step`` counter)
STANDARD_STATES: dict[str, tuple[tuple[str, ...], bool]] = {
    "adamw": (("exp_avg", "exp_avg_sq"), True),
    "adam": (("exp_avg", "exp_avg_sq"), True),
    "sgd": (("momentum_buffer",), False),
    "lion": (("exp_avg",), False),  # no torch.optim.Lion; the usual fp32 implementation
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------ models


@dataclass
class ModelShapes:
    """Parameter shapes of a model (tied parameters counted once) and where they came from."""

    source: str
    shapes: list[Shape]
    note: str = ""

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def shapes_from_module(model: nn.Module) -> list[Shape]:
    """Shapes of ``model.parameters()`` (which lists a tied parameter once), in order."""
    return [tuple(p.shape) for p in model.parameters()]


def shard_shapes(shapes: list[Shape], shards: int) -> list[Shape]:
    """The local shapes of the rank holding the most rows when every parameter is split by dim 0 over
    ``shards`` ranks, as FSDP2 (``fully_shard``) splits it (``torch.chunk``: the first ranks get
    ``ceil(rows / shards)`` rows); 0-d parameters stay whole. leanopt's states follow the rows (its
    8/4-bit groups lie within a row), so laying out these shapes gives that rank's bytes exactly."""
    return [((-(-s[0] // shards)), *s[1:]) if len(s) else s for s in shapes]


def shapes_from_count(n: int, width: int = 4096) -> list[Shape]:
    """A stand-in for a model known only by its size: ``n`` parameters as rows of ``width`` columns."""
    rows, rest = divmod(n, width)
    return [s for s in ((rows, width), (rest,)) if math.prod(s) > 0]


def _gpt2_shapes(cfg: dict[str, Any]) -> list[Shape]:
    e, v = int(cfg["n_embd"]), int(cfg["vocab_size"])
    p = int(cfg.get("n_positions") or cfg.get("n_ctx") or 1024)
    inner = int(cfg.get("n_inner") or 4 * e)
    shapes: list[Shape] = [(v, e), (p, e)]  # lm_head is tied to wte in GPT-2
    for _ in range(int(cfg["n_layer"])):
        shapes += [(e,), (e,), (e, 3 * e), (3 * e,), (e, e), (e,), (e,), (e,), (e, inner), (inner,), (inner, e), (e,)]
    return shapes + [(e,), (e,)]


def _llama_shapes(cfg: dict[str, Any], model_type: str) -> list[Shape]:
    h, v, inter = int(cfg["hidden_size"]), int(cfg["vocab_size"]), int(cfg["intermediate_size"])
    nh = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = int(cfg.get("head_dim") or h // nh)
    qkv_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
    o_bias = bool(cfg.get("attention_bias", False)) and model_type != "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    experts = int(cfg.get("num_local_experts") or 0)
    shapes: list[Shape] = [(v, h)]
    for _ in range(int(cfg["num_hidden_layers"])):
        shapes += [(nh * hd, h), (nkv * hd, h), (nkv * hd, h), (h, nh * hd)]
        if qkv_bias:
            shapes += [(nh * hd,), (nkv * hd,), (nkv * hd,)]
        if o_bias:
            shapes += [(h,)]
        if model_type == "qwen3":
            shapes += [(hd,), (hd,)]  # q_norm, k_norm
        mlp = [(inter, h), (inter, h), (h, inter)] + ([(inter,), (inter,), (h,)] if mlp_bias else [])
        if experts:
            shapes += [(experts, h)] + mlp * experts  # router + experts
        else:
            shapes += mlp
        shapes += [(h,), (h,)]  # input and post-attention RMSNorm
    shapes += [(h,)]
    if not cfg.get("tie_word_embeddings", model_type not in ("llama", "mistral", "mixtral", "qwen2", "qwen3")):
        shapes += [(v, h)]
    return shapes


_HF_TYPES = {"gpt2": _gpt2_shapes}
_LLAMA_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")


def shapes_from_hf_config(path: Path) -> list[Shape]:
    """Parameter shapes from a Hugging Face ``config.json`` (GPT-2 and Llama-style models)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot read config file {str(path)!r}: {err}") from None
    except json.JSONDecodeError as err:
        raise CLIError(f"config file {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise CLIError(f"config file {str(path)!r} must hold a JSON object")
    model_type = str(cfg.get("model_type", "")).lower()
    supported = sorted([*_HF_TYPES, *_LLAMA_TYPES])
    try:
        if model_type in _HF_TYPES:
            return _HF_TYPES[model_type](cfg)
        if model_type in _LLAMA_TYPES:
            return _llama_shapes(cfg, model_type)
    except KeyError as err:
        raise CLIError(f"config file {str(path)!r} ({model_type}) lacks the field {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise CLIError(f"config file {str(path)!r} has a field of the wrong type: {err}") from None
    raise CLIError(
        f"config file {str(path)!r}: model_type {model_type or '(missing)'!r} is not supported; supported: "
        f"{', '.join(supported)} (for other models give a parameter count or a module:factory path)"
    )


def _load_factory(spec: str) -> Any:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise CLIError(f"model {spec!r}: a factory is written module:factory (e.g. mypkg.models:build)")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise CLIError(f"model {spec!r}: file {module_name!r} not found")
            mod_spec = importlib.util.spec_from_file_location(file.stem, file)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except CLIError:
        raise
    except ImportError as err:
        raise CLIError(f"model {spec!r}: cannot import module {module_name!r} ({err})") from None
    except Exception as err:  # the user's module failed while importing
        raise CLIError(f"model {spec!r}: importing {module_name!r} raised {type(err).__name__}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CLIError(f"model {spec!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def shapes_from_factory(spec: str) -> tuple[list[Shape], str]:
    """Build ``module:factory()`` on the meta device (no memory) and read its parameter shapes."""
    factory = _load_factory(spec)
    note = "built on the meta device"
    try:
        with torch.device("meta"):
            model = factory()
    except Exception:  # some factories cannot run on meta; build for real
        note = "built on the CPU (the factory failed on the meta device)"
        try:
            model = factory()
        except Exception as err:
            raise CLIError(f"model {spec!r}: calling the factory raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    shapes = shapes_from_module(model)
    if not shapes:
        raise CLIError(f"model {spec!r}: the module has no parameters")
    return shapes, note


def _preset_shapes(name: str) -> list[Shape]:
    from ..models import GPT, GPT2_SMALL, TINY_BYTES

    cfg = {"gpt2-small": GPT2_SMALL, "gpt2": GPT2_SMALL, "tiny-bytes": TINY_BYTES}[name]
    with torch.device("meta"):
        return shapes_from_module(GPT(cfg))


PRESETS = ("gpt2-small", "gpt2", "tiny-bytes")


def resolve_model(spec: str) -> ModelShapes:
    """A model given as a preset name, a parameter count, a config.json path or ``module:factory``."""
    text = spec.strip()
    if text.lower() in PRESETS:
        return ModelShapes(f"built-in {text.lower()} (leanopt.models)", _preset_shapes(text.lower()))
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise CLIError(f"model {spec!r}: directory has no config.json")
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise CLIError(f"model {spec!r}: config file not found")
        return ModelShapes(f"Hugging Face config {str(path)}", shapes_from_hf_config(path))
    if ":" in text:
        shapes, note = shapes_from_factory(text)
        return ModelShapes(f"factory {text}", shapes, note)
    try:
        n = parse_count(text)
    except CLIError:
        raise CLIError(
            f"unknown model {spec!r}: give a parameter count (124M, 7B, 1.3e9), a preset ({', '.join(PRESETS)}), "
            "a Hugging Face config.json path, or a Python module:factory"
        ) from None
    return ModelShapes(
        "a parameter count",
        shapes_from_count(n),
        "laid out as rows of 4096 columns; give a config.json or module:factory for the exact tensor shapes",
    )


# ------------------------------------------------------------------------------------ layouts


@dataclass(frozen=True)
class Mode:
    """A leanopt configuration: weight format (``master``), state format and gradient release."""

    master: str
    states: str
    release: bool = False

    @property
    def name(self) -> str:
        return f"{self.master}/{self.states}" + ("+release" if self.release else "")

    @classmethod
    def parse(cls, text: str) -> Mode:
        body, plus, tail = text.strip().partition("+")
        if plus and tail != "release":
            raise CLIError(f"mode {text!r}: only '+release' may follow MASTER/STATES")
        master, slash, states = body.partition("/")
        if not master:
            raise CLIError(f"mode {text!r}: write MASTER/STATES[+release], e.g. exact/fp32 or compact/int8+release")
        return cls(master, states if slash else "fp32", bool(plus))


@dataclass
class Layout(ByteTotals):
    """Bytes by category (the same categories as :class:`leanopt.MemoryReport`)."""

    name: str
    label: str
    num_params: int
    by_category: dict[str, int]
    kind: str = "leanopt"  # leanopt | standard | peer
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _state_tensors(opt: torch.optim.Optimizer, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Meta tensors for the state the optimizer will hold for ``p`` after its first step."""
    expected = getattr(opt, "_expected_layout", None)
    if callable(expected):
        layout = expected(p, group)
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in layout.items()}
    wfmt, sfmt = opt.formats(p, group)  # pragma: no cover - fallback if the private helper goes away
    out = {"step": torch.empty((), dtype=torch.float32, device="meta"), **wfmt.init_buffers(p.detach())}
    for spec in opt.rule.states(group):
        out.update(sfmt.init(spec.name, p.detach(), spec.signed))
    return out


def leanopt_layout(shapes: list[Shape], optimizer: str, mode: Mode, dtype: torch.dtype = torch.bfloat16) -> Layout:
    """Bytes a leanopt optimizer holds for parameters of ``shapes`` in ``mode``, from its formats.

    Builds the optimizer over meta-device parameters (one per distinct shape, weighted by how often it
    occurs) and reads the dtypes and shapes of the state it would create; nothing is allocated.
    """
    import leanopt
    from leanopt.memory import state_category

    cls_name, hyper = OPTIMIZERS[optimizer]
    counts = Counter(shapes)
    params = [nn.Parameter(torch.empty(s, dtype=dtype, device="meta")) for s in counts]
    try:
        opt = getattr(leanopt, cls_name)(params, master=mode.master, states=mode.states, **hyper)
    except (ValueError, TypeError) as err:
        raise CLIError(f"mode {mode.name!r} with --optimizer {optimizer}: {err}") from None
    size = torch.empty((), dtype=dtype).element_size()
    cats: dict[str, int] = {"weights": 0, "master": 0, "gradients": 0}
    for group in opt.param_groups:
        for p in group["params"]:
            n, k = p.numel(), counts[tuple(p.shape)]
            cats["weights"] += k * n * size
            if not mode.release:
                cats["gradients"] += k * n * size
            try:
                tensors = _state_tensors(opt, p, group)
            except Exception as err:
                raise CLIError(f"mode {mode.name!r}: cannot lay out its state on the meta device ({err})") from None
            for key, t in tensors.items():
                cat = state_category(key, t)
                cats[cat] = cats.get(cat, 0) + k * t.numel() * t.element_size()
    label = f"leanopt {mode.master} weights, {mode.states} states" + (", gradient release" if mode.release else "")
    return Layout(mode.name, label, sum(math.prod(s) for s in shapes), cats)


def standard_layout(shapes: list[Shape], optimizer: str) -> Layout:
    """The standard mixed-precision recipe: fp32 weights, fp32 gradients, torch.optim fp32 states."""
    names, has_step = STANDARD_STATES[optimizer]
    n = sum(math.prod(s) for s in shapes)
    cats = {"weights": 4 * n, "master": 0, "gradients": 4 * n, **{s: 4 * n for s in names}}
    if has_step:
        cats["other"] = 4 * len(shapes)
    return Layout(
        "standard",
        "standard mixed precision: fp32 weights + grads, torch.optim fp32 states",
        n,
        cats,
        "standard",
        "torch.optim with fp32 parameters (bf16 autocast adds activations and a bf16 weight cache, not counted)",
    )


#: Published layouts of other libraries, in bytes per parameter by category (their figures; see
#: docs/demo.md and the project's field notes). ``states`` holds all optimizer states with their scales.
PEERS: list[dict[str, Any]] = [
    {
        "name": "flashoptim", "optimizers": ("adamw", "adam"),
        "label": "FlashOptim AdamW (bf16 + int8 residual, int8 states /32, fp16 scales)",
        "bpp": {"weights": 2, "master": 1, "gradients": 2, "states": 2.125},
        "source": "FlashOptim paper (arXiv 2602.23349): 7.125 B/param",
    },
    {
        "name": "flashoptim+release", "optimizers": ("adamw", "adam"),
        "label": "FlashOptim AdamW with gradient release",
        "bpp": {"weights": 2, "master": 1, "gradients": 0, "states": 2.125},
        "source": "FlashOptim paper: 5.125 B/param with gradient release",
    },
    {
        "name": "flashoptim-32bit", "optimizers": ("adamw", "adam"),
        "label": "FlashOptim AdamW, 32-bit master mode (int16 residual)",
        "bpp": {"weights": 2, "master": 2, "gradients": 2, "states": 2.125},
        "source": "FlashOptim paper: 8.125 B/param",
    },
    {
        "name": "flashoptim", "optimizers": ("sgd", "lion"),
        "label": "FlashOptim SGD-momentum / Lion (int8 momentum)",
        "bpp": {"weights": 2, "master": 1, "gradients": 2, "states": 1.0625},
        "source": "FlashOptim paper: 6.06 B/param",
    },
    {
        "name": "flashoptim+release", "optimizers": ("sgd", "lion"),
        "label": "FlashOptim SGD-momentum / Lion with gradient release",
        "bpp": {"weights": 2, "master": 1, "gradients": 0, "states": 1.0625},
        "source": "FlashOptim paper: 4.06 B/param",
    },
    {
        "name": "bnb-8bit", "optimizers": ("adamw", "adam"),
        "label": "bitsandbytes AdamW8bit (fp32 weights + grads, 8-bit states /256, fp32 scales)",
        "bpp": {"weights": 4, "master": 0, "gradients": 4, "states": 2 * (1 + 4 / 256)},
        "source": "bitsandbytes blockwise layout: blocks of 256 with one fp32 absmax",
    },
    {
        "name": "torchao-8bit", "optimizers": ("adamw", "adam"),
        "label": "torchao AdamW8bit (fp32 weights + grads, 8-bit states /256, fp32 scales)",
        "bpp": {"weights": 4, "master": 0, "gradients": 4, "states": 2 * (1 + 4 / 256)},
        "source": "torchao.optim layout: blocks of 256, one fp32 scale each",
    },
    {
        "name": "torchao-4bit", "optimizers": ("adamw", "adam"),
        "label": "torchao AdamW4bit (fp32 weights + grads, 4-bit states /128, fp32 scales)",
        "bpp": {"weights": 4, "master": 0, "gradients": 4, "states": 2 * (0.5 + 4 / 128)},
        "source": "torchao.optim layout: blocks of 128, one fp32 scale each",
    },
]  # fmt: skip


def peer_layouts(num_params: int, optimizer: str) -> list[Layout]:
    """The peers' published layouts for ``optimizer``, scaled to ``num_params``."""
    out = []
    for peer in PEERS:
        if optimizer in peer["optimizers"]:
            cats = {k: int(round(v * num_params)) for k, v in peer["bpp"].items()}
            out.append(Layout(peer["name"], peer["label"], num_params, cats, "peer", peer["source"]))
    return out


def default_modes(features: Features, dtype: torch.dtype = torch.bfloat16) -> list[Mode]:
    """The leanopt modes shown by default: those the installed formats support, plain to compact."""
    base = "exact" if dtype == torch.bfloat16 else "kahan"
    wanted = [
        Mode(base, "fp32"),
        Mode(base, "fp32", True),
        Mode(base, "bf16"),
        Mode(base, "bf16", True),
        Mode("compact", "int8"),
        Mode("compact", "int8", True),
        Mode("compact", "int4", True),
        # no bytes beyond the 16-bit weight (stochastic rounding): the smallest
        Mode("stochastic", "int8", True),
        Mode("stochastic", "int4", True),
    ]
    from leanopt.formats.weights import resolve_weight_format

    def supported(m: Mode) -> bool:
        if not (features.has_master(m.master) and features.has_states(m.states)):
            return False
        try:
            resolve_weight_format(m.master, dtype)
        except (ValueError, KeyError):
            return False
        return features.release or not m.release

    return [m for m in wanted if supported(m)]


def check_mode(mode: Mode, features: Features) -> None:
    """Raise CLIError if this installation lacks a part of ``mode``."""
    if not features.has_master(mode.master):
        raise CLIError(f"mode {mode.name!r}: unknown master {mode.master!r}; accepted: {', '.join(features.masters)}")
    if not features.has_states(mode.states):
        raise CLIError(f"mode {mode.name!r}: unknown states {mode.states!r}; accepted: {', '.join(features.states)}")
    if mode.release and not features.release:
        raise CLIError(f"mode {mode.name!r}: gradient release (leanopt.release_gradients) is not in this install")


# ------------------------------------------------------------------------------------ command


def build_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan",
        help="memory needed for a model's weights, gradients and optimizer states, per mode",
        description=(
            "Memory for weights, gradients and optimizer states (not activations) in each leanopt mode, next to "
            "the standard recipe (fp32 weights + torch.optim) and other libraries' published layouts."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="parameter count (124M, 7B), preset, config.json path or module:factory")
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS), help="default: adamw (sgd: momentum)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="16-bit weight dtype (default bf16)")
    p.add_argument("--modes", help="comma list of MASTER/STATES[+release], e.g. exact/fp32,compact/int8+release")
    p.add_argument("--memory", help="memory available, e.g. 24GB or 80GiB: says which modes fit")
    p.add_argument(
        "--shards",
        type=int,
        default=1,
        metavar="N",
        help="per rank when FSDP2 (fully_shard) shards the model over N ranks (default 1: unsharded)",
    )
    p.add_argument("--no-peers", action="store_true", help="leave out other libraries' layouts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def make_plan(
    model: str,
    optimizer: str = "adamw",
    dtype: str = "bf16",
    modes: list[Mode] | None = None,
    peers: bool = True,
    shards: int = 1,
) -> tuple[ModelShapes, list[Layout]]:
    """The rows of ``leanopt plan``: standard recipe, leanopt modes, then peers; with ``shards`` > 1 the
    bytes one rank holds under FSDP2's sharding by dim 0 (the rank with the most rows)."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise CLIError(f"--shards must be a positive whole number of ranks, got {shards!r}")
    if optimizer not in OPTIMIZERS:
        raise CLIError(f"--optimizer {optimizer!r} is not known; accepted: {', '.join(sorted(OPTIMIZERS))}")
    if dtype not in DTYPES:
        raise CLIError(f"--dtype {dtype!r} is not known; accepted: {', '.join(sorted(DTYPES))}")
    shapes = resolve_model(model)
    features = detect_features()
    modes = default_modes(features, DTYPES[dtype]) if modes is None else modes
    for m in modes:
        check_mode(m, features)
    local = shard_shapes(shapes.shapes, shards) if shards > 1 else shapes.shapes
    rows = [standard_layout(local, optimizer)]
    rows += [leanopt_layout(local, optimizer, m, DTYPES[dtype]) for m in modes]
    if peers:
        rows += peer_layouts(sum(math.prod(s) for s in local), optimizer)
    return shapes, rows


def _grouped(layout: Layout) -> dict[str, int]:
    c = layout.by_category
    fixed = ("weights", "master", "gradients", "other")
    return {
        "weights": c.get("weights", 0),
        "master": c.get("master", 0),
        "gradients": c.get("gradients", 0),
        "states": sum(v for k, v in c.items() if k not in fixed),
        "other": c.get("other", 0),
    }


def render(shapes: ModelShapes, rows: list[Layout], optimizer: str, memory: int | None, shards: int = 1) -> str:
    from .common import table

    std = rows[0].total_bytes
    header = ["mode", "weights", "master", "grads", "states", "total", "B/param", "vs standard"]
    if memory is not None:
        header.append(f"fits {format_bytes(memory)}?")
    body = []
    for r in rows:
        g = _grouped(r)
        states = g["states"] + g["other"]
        name = {"peer": f"{r.name} (published)", "standard": "standard (torch.optim)"}.get(r.kind, r.name)
        line = [
            name, format_bytes(g["weights"]), format_bytes(g["master"]), format_bytes(g["gradients"]),
            format_bytes(states), format_bytes(r.total_bytes), f"{r.bytes_per_param:.3f}",
            f"{r.total_bytes / std:.2f}x",
        ]  # fmt: skip
        if memory is not None:
            left = memory - r.total_bytes
            line.append(f"yes, {format_bytes(left)} left" if left >= 0 else f"no, {format_bytes(-left)} short")
        body.append(line)
    out = [f"model: {shapes.source}, {shapes.num_params:,} parameters ({format_count(shapes.num_params)})"]
    if shapes.note:
        out.append(f"  ({shapes.note})")
    if shards > 1:
        out.append(
            f"sharded over {shards} ranks by dim 0 (FSDP2 fully_shard): per rank, the one with the most "
            f"rows ({rows[0].num_params:,} of the parameters); FSDP2's all-gathered layers during compute not counted"
        )
    out.append(f"optimizer: {optimizer}; bytes for weights, gradients and optimizer states (not activations)\n")
    out.append(table(body, header))
    out.append(
        "\nleanopt rows come from the formats' own tensors, as leanopt.memory_report measures them.\n"
        "'+release' keeps no gradients between steps (one tensor's gradient at a time during backward)."
    )
    if any(r.kind == "peer" for r in rows):
        out.append("'(published)' rows are other libraries' layouts as they publish them, not measured here.")
    if memory is not None:
        out.append("'fits' leaves out activations and framework overhead: keep headroom.")
    return "\n".join(out)


def to_json(shapes: ModelShapes, rows: list[Layout], optimizer: str, memory: int | None, shards: int = 1
            ) -> dict[str, Any]:  # fmt: skip
    std = rows[0].total_bytes
    return jsonable({
        "model": {"source": shapes.source, "num_params": shapes.num_params, "note": shapes.note,
                  "num_tensors": len(shapes.shapes)},
        "shards": shards,  # > 1: every row is one rank's bytes (the rank with the most rows)
        "params_per_rank": rows[0].num_params,
        "optimizer": optimizer,
        "memory_bytes": memory,
        "rows": [
            {"name": r.name, "kind": r.kind, "label": r.label, "source": r.source, "by_category": r.by_category,
             "grouped": _grouped(r), "total_bytes": r.total_bytes, "bytes_per_param": r.bytes_per_param,
             "ratio_vs_standard": r.total_bytes / std,
             **({"fits": r.total_bytes <= memory} if memory is not None else {})}
            for r in rows
        ],
    })  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Entry point of ``leanopt plan``."""
    modes = None
    if args.modes is not None:
        modes = [Mode.parse(t) for t in args.modes.split(",") if t.strip()]
        if not modes:
            raise CLIError("--modes is empty; give e.g. exact/fp32,compact/int8+release")
    memory = parse_bytes(args.memory) if args.memory is not None else None
    shapes, rows = make_plan(args.model, args.optimizer, args.dtype, modes, peers=not args.no_peers, shards=args.shards)
    if args.json:
        print(json.dumps(to_json(shapes, rows, args.optimizer, memory, args.shards), indent=2))
    else:
        print(render(shapes, rows, args.optimizer, memory, args.shards))
    return 0
