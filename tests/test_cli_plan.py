"""``leanopt plan``: model parsing, and its figures equal what memory_report measures on real models."""

from __future__ import annotations

import json
import math

import pytest
import torch

import leanopt
from leanopt.cli import main
from leanopt.cli.common import CLIError, detect_features, parse_bytes, parse_count
from leanopt.cli.plan import (
    Mode,
    default_modes,
    leanopt_layout,
    make_plan,
    resolve_model,
    shapes_from_hf_config,
    shapes_from_module,
    shard_shapes,
    standard_layout,
)
from leanopt.models import GPT, GPTConfig

SMALL = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
FEATURES = detect_features()
MODES = default_modes(FEATURES)


def _one_step(model, opt, release_handle=None):
    x = torch.randint(0, SMALL.vocab_size, (2, SMALL.block_size), generator=torch.Generator().manual_seed(0))
    _, loss = model(x, x)
    loss.backward()
    opt.step()


CASES = [("adamw", m) for m in MODES] + [(o, m) for o in ("sgd", "lion") for m in (MODES[0], MODES[-1])]


@pytest.mark.parametrize("optimizer,mode", CASES, ids=[f"{o}-{m.name}" for o, m in CASES])
def test_plan_bytes_equal_memory_report_after_a_real_step(optimizer, mode):
    torch.manual_seed(0)
    model = GPT(SMALL).bfloat16()
    cls, hyper = {"adamw": (leanopt.AdamW, {}), "sgd": (leanopt.SGD, {"momentum": 0.9}), "lion": (leanopt.Lion, {})}[
        optimizer
    ]
    opt = cls(model.parameters(), lr=1e-3, master=mode.master, states=mode.states, **hyper)
    if mode.release:
        leanopt.release_gradients(opt)
    _one_step(model, opt)
    measured = leanopt.memory_report(opt).by_category
    planned = leanopt_layout(shapes_from_module(model), optimizer, mode).by_category
    assert planned == measured


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_standard_row_equals_memory_report_of_torch_optim(optimizer):
    torch.manual_seed(0)
    model = GPT(SMALL)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    _one_step(model, opt)
    assert standard_layout(shapes_from_module(model), optimizer).by_category == leanopt.memory_report(opt).by_category


def test_plan_of_a_count_matches_memory_report_of_the_same_shapes():
    model = resolve_model("10000")  # rows of 4096: (2, 4096) and (1808,)
    assert model.shapes == [(2, 4096), (1808,)] and model.num_params == 10_000
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in model.shapes]
    opt = leanopt.AdamW(params, master="exact")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert (
        leanopt_layout(model.shapes, "adamw", Mode("exact", "fp32")).by_category
        == leanopt.memory_report(opt).by_category
    )


def _gpt2_config(tmp_path, **over):
    cfg = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
    cfg.update(over)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_hf_gpt2_config_counts_124m_like_the_built_model(tmp_path):
    shapes = shapes_from_hf_config(_gpt2_config(tmp_path))
    assert sum(torch.Size(s).numel() for s in shapes) == 124_439_808
    # the same count as leanopt's own GPT-2-small, built on the meta device
    assert resolve_model("gpt2-small").num_params == 124_439_808


def test_hf_llama_configs_count_like_the_published_models(tmp_path):
    llama2 = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    }
    llama3 = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }
    for cfg, expected in ((llama2, 6_738_415_616), (llama3, 8_030_261_248)):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(cfg))
        assert resolve_model(str(path)).num_params == expected
    assert resolve_model(str(tmp_path)).num_params == 8_030_261_248  # a folder holding config.json


def test_module_factory_is_built_on_meta_and_counted(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 10))\n"
        "    assert next(m.parameters()).device.type == 'meta'\n"
        "    return m\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = resolve_model("my_models:build")
    assert model.num_params == 1000 * 1000 + 1000 + 1000 * 10 + 10
    assert "meta" in model.note


@pytest.mark.parametrize(
    "text,expected",
    [("124M", 124_000_000), ("7B", 7_000_000_000), ("1.3e9", 1_300_000_000), ("350k", 350_000), ("1_000", 1000)],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("text,expected", [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("512 MiB", 512 * 2**20)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12X", "-5M", "0", "1e400"])
def test_parse_count_rejects_nonsense(text):
    with pytest.raises(CLIError, match="count"):
        parse_count(text)


@pytest.mark.parametrize("text", ["24 parsecs", "GB", "-1GB", "0"])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(CLIError, match="--memory"):
        parse_bytes(text)


def test_plan_json_and_memory_fit(capsys):
    assert main(["plan", "gpt2-small", "--memory", "1GiB", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["rows"]}
    assert doc["model"]["num_params"] == 124_439_808
    assert rows["standard"]["bytes_per_param"] == pytest.approx(16.0, abs=1e-5)
    assert rows["standard"]["fits"] is False  # ~1.85 GiB
    assert rows["exact/fp32"]["bytes_per_param"] == pytest.approx(14.0, abs=1e-5)
    assert rows["exact/fp32"]["grouped"]["master"] == 2 * 124_439_808
    for r in doc["rows"]:
        assert r["fits"] == (r["total_bytes"] <= 2**30)
    assert any(r["kind"] == "peer" and r["name"].startswith("flashoptim") for r in doc["rows"])


def test_plan_table_lists_modes_and_peers(capsys):
    assert main(["plan", "7B", "--memory", "24GB", "--modes", "exact/fp32,exact/bf16"]) == 0
    out = capsys.readouterr().out
    assert "standard (torch.optim)" in out and "exact/bf16" in out and "torchao-4bit (published)" in out
    assert "no," in out and "fits 22.35 GiB?" in out


def test_shards_lay_out_the_rank_with_the_most_rows():
    """FSDP2 splits dim 0 as torch.chunk does: the first ranks get ceil(rows / ranks) rows; 0-d stays whole."""
    assert shard_shapes([(5, 40), (5,), (34, 5), (2, 34), ()], 2) == [(3, 40), (3,), (17, 5), (1, 34), ()]
    assert shard_shapes([(5, 40)], 8) == [(1, 40)]
    whole = {r.name: r for r in make_plan("gpt2-small", modes=MODES)[1]}
    for shards in (2, 8):
        shapes, rows = make_plan("gpt2-small", modes=MODES, shards=shards)
        local = sum(math.prod(s) for s in shard_shapes(shapes.shapes, shards))
        assert shapes.num_params / shards <= local < shapes.num_params / shards * 1.01  # padding to whole rows
        for r in rows:
            assert r.num_params == local
            assert whole[r.name].total_bytes / shards <= r.total_bytes < whole[r.name].total_bytes / shards * 1.01
        peers = [r for r in rows if r.kind == "peer"]  # published bytes per parameter, times this rank's
        assert peers and all(r.total_bytes == pytest.approx(whole[r.name].total_bytes * local / shapes.num_params,
                                                            rel=1e-6) for r in peers)  # fmt: skip


def test_plan_shards_on_the_command_line(capsys):
    assert main(["plan", "7B", "--shards", "8", "--memory", "80GB", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shards"] == 8 and doc["params_per_rank"] == 875_000_000
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["standard"]["total_bytes"] == 16 * 875_000_000 + 4 * 2  # fp32 weights, grads, 2 states; 2 steps
    assert main(["plan", "7B", "--shards", "8"]) == 0
    assert "sharded over 8 ranks by dim 0" in capsys.readouterr().out
    for bad in ("0", "-2"):
        assert main(["plan", "7B", "--shards", bad]) != 0
        assert "--shards must be a positive whole number of ranks" in capsys.readouterr().err
