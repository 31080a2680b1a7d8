"""The pretrain/finetune/evaluate/predict/generate subcommands, through pyllm.train.cli."""

import argparse
import json
import sys

import pytest

from pyllm.train import cli

from .conftest import TINY_MODEL

COMMANDS = ["pretrain", "finetune", "evaluate", "predict", "generate", "plan"]
FAST = ["--no-progress", "--no-plot", "--device", "cpu", "--distributed", "none"]
TINY = [x for k, v in TINY_MODEL.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def parser():
    p = argparse.ArgumentParser(prog="pyllm")
    cli.add_parsers(p.add_subparsers(dest="command"))
    return p


def run(argv):
    args = parser().parse_args(argv)
    return args.func(args)


def test_cli_module_imports_only_stdlib():
    # `pyllm --help` must stay fast: the CLI module (and the config module it reads its flags
    # from) import only the standard library at the top level; torch & co load inside commands.
    import ast
    from pathlib import Path

    for name in ("cli.py", "config.py"):
        tree = ast.parse((Path(cli.__file__).parent / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the config module is allowed
                    assert node.module == "config" or node.module is None, f"{name}: from .{node.module}"
                    continue
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__", f"{name} imports {m} at the top"


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pyllm {command}")
    if command in ("pretrain", "finetune"):
        assert "--config FILE.json" in out and "--learning-rate" in out and "--resume" in out


def test_pretrain_generate_end_to_end(tmp_path, corpus_file, capsys):
    out = tmp_path / "gpt"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"max_steps": 99, "batch_size": 4, "learning-rate": 0.003}))
    argv = ["pretrain", "--config", str(cfg), "--max-steps", "3", "--train-file", str(corpus_file),
            "--output-dir", str(out), "--sample-tokens", "4", *TINY, *FAST]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "sample:" in printed and "train loss" in printed
    assert printed.startswith("memory plan: peak ") and "planned_peak_mb" in printed  # the plan comes first
    saved = json.loads((out / "pyllm_run.json").read_text())["config"]
    assert saved["max_steps"] == 3 and saved["batch_size"] == 4 and saved["learning_rate"] == 0.003  # flag > file
    # The same folder again: a clear error and exit code 2, nothing overwritten.
    assert run(argv) == 2
    assert "already holds a 'pretrain' run" in capsys.readouterr().err
    assert run(["generate", str(out), "The parser", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The parser")
    assert run(["evaluate", str(out), "--data", str(corpus_file), "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_finetune_evaluate_predict_end_to_end(tmp_path, tiny_bert, cls_files, capsys):
    train, dev = cls_files
    out = tmp_path / "cls"
    assert run(["finetune", "--model", str(tiny_bert), "--train-file", str(train), "--validation-file", str(dev),
                "--output-dir", str(out), "--max-steps", "3", "--batch-size", "8", "--max-length", "24", *FAST]) == 0
    assert "eval_accuracy" in capsys.readouterr().out
    assert run(["evaluate", str(out), "--data", str(dev), "--device", "cpu"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert run(["predict", str(out), "the module opens the file", "--json", "--device", "cpu"]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rec["label"] in ("neg", "pos") and 0 <= rec["score"] <= 1


def test_bad_config_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text('{"max_stepz": 3}')
    assert run(["pretrain", "--config", str(bad)]) == 2
    assert "unknown key(s) ['max_stepz']" in capsys.readouterr().err


def test_simple_commands_take_config_files(tmp_path, corpus_file, capsys):
    out = tmp_path / "gpt"
    assert run(["pretrain", "--max-steps", "2", "--train-file", str(corpus_file), "--output-dir", str(out),
                "--sample-prompt", "", *TINY, *FAST]) == 0
    capsys.readouterr()
    cfg = tmp_path / "gen.json"
    cfg.write_text(json.dumps({"folder": str(out), "max_new_tokens": 3, "device": "cpu", "prompt": ["The file"]}))
    assert run(["generate", "--config", str(cfg), "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The file")
    cfg.write_text(json.dumps({"folder": str(out), "bogus": 1}))
    assert run(["generate", "--config", str(cfg)]) == 2
    assert "unknown key(s) ['bogus']" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["generate", "--help"], ["bench", "--help"]])
def test_help_loads_no_torch(argv):
    """`pyllm --help` and `pyllm <command> --help` build their parsers from standard-library modules
    only (issue 10: one lazy-import mechanism that works): torch is never imported."""
    import subprocess

    code = ("import sys\nfrom pyllm.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'tokenizers' in sys.modules)" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"
