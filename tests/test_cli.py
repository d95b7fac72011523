"""The ``leanopt`` command line: help, and one-line errors with a non-zero exit for bad arguments."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from leanopt.cli import main


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("LEANOPT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "leanopt", *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_help_lists_commands_with_examples_through_the_real_entry_point():
    res = _run("--help")
    assert res.returncode == 0
    for word in ("demo", "plan", "bench", "examples:", "leanopt plan 7B --memory 24GB"):
        assert word in res.stdout


@pytest.mark.parametrize("command", ["demo", "plan", "bench"])
def test_each_command_has_help_with_examples(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"leanopt {command}" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan", "notamodel"], "unknown model 'notamodel'"),
        (["plan", "12Q"], "unknown model '12Q'"),
        (["plan", "missing/config.json"], "config file not found"),
        (["plan", "124M", "--memory", "lots"], "cannot read --memory 'lots'"),
        (["plan", "124M", "--modes", "exact/int3"], "unknown states 'int3'"),
        (["plan", "124M", "--modes", "nope/fp32"], "unknown master 'nope'"),
        (["plan", "124M", "--modes", "exact/fp32+fast"], "only '+release'"),
        (["plan", "no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
        (["plan", "os:no_such_factory"], "has no callable 'no_such_factory'"),
        (["plan", "124M", "--optimizer", "adagrad"], "invalid choice: 'adagrad'"),
        (["plan"], "the following arguments are required: model"),
        (["bench", "--size", "huge"], "unknown model 'huge'"),
        (["bench", "--steps", "0"], "--steps must be at least 1"),
        (["bench", "--steps", "many"], "invalid int value: 'many'"),
        (["bench", "--device", "tpu"], "--device 'tpu'"),
        (["bench", "--size", "1000", "--modes", "exact/fp32+release"], "drop '+release'"),
        (["demo", "--steps", "1"], "--steps must be at least 2"),
        (["demo", "--configs", "exact/int3"], "unknown states 'int3'"),
        (["demo", "--model", "huge"], "invalid choice: 'huge'"),
        (["demo", "--lr", "-1"], "--lr must be in (0, 1)"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, needle, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert needle in lines[0]
    assert lines[0].startswith("leanopt")
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan", "lots-of-params"], "unknown model"),
        (["plan", "124M", "--memory", "24 parsecs"], "--memory"),
        (["plan", "nope/config.json"], "not found"),
        (["demo", "--out", "/dev/null/x"], "--out"),
    ],
)
def test_bad_arguments_through_a_real_process_print_no_traceback(args, needle):
    res = _run(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_broken_config_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["plan", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    bad.write_text('{"model_type": "t5", "d_model": 512}')
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model_type 't5' is not supported" in err and "llama" in err
    bad.write_text('{"model_type": "llama", "hidden_size": 64}')
    assert main(["plan", str(bad)]) == 2
    assert "lacks the field" in capsys.readouterr().err


def test_a_factory_that_raises_is_reported_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_models.py").write_text("def build():\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plan", "broken_models:build"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RuntimeError: boom" in err
