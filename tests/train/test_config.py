"""Typed configuration (issue 11): every option is checked for type and range where it is read -- flags,
--config JSON, keyword arguments -- with a message naming the option, the expected and the received;
nothing is written before the check. Tests are named after the defect numbers of issue 11."""

import json

import pytest

from pyllm.train import ConfigError, PretrainConfig, cli, generate, pretrain

from .conftest import QUIET, TINY_MODEL
from .test_cli import FAST, TINY, run


def test_defect_4_negative_max_grad_norm_is_refused(tmp_path, corpus_file, capsys):
    """Clipping with a negative norm flips the gradient (gradient ascent): refused before anything runs."""
    out = tmp_path / "run"
    argv = ["pretrain", "--max-grad-norm", "-1", "--max-steps", "2", "--train-file", str(corpus_file),
            "--output-dir", str(out), *TINY, *FAST]
    assert run(argv) == 2
    assert "--max-grad-norm must be a finite number >= 0 (or null), got -1.0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"pretrain: max_grad_norm must be a finite number >= 0 \(or null\)"):
        pretrain(max_grad_norm=-1, train_file=str(corpus_file), output_dir=str(out), max_steps=2, **QUIET,
                 **TINY_MODEL)
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--max-time", "0"], "--max-time must be a finite number > 0 (or null), got 0.0"),
    (["--max-time", "-5"], "--max-time must be a finite number > 0 (or null), got -5.0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be an integer >= 1 (or null), got 0"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number > 0, got inf"),
])
def test_defect_11_out_of_range_flags(tmp_path, flags, message, capsys):
    assert run(["pretrain", *flags, "--output-dir", str(tmp_path / "run"), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_defect_11_negative_temperature(tmp_path, capsys):
    """generate --temperature -1 was silently greedy."""
    assert run(["generate", str(tmp_path), "--temperature", "-1"]) == 2
    assert "--temperature must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"generate: temperature must be a finite number >= 0, got -1"):
        generate(tmp_path, ["x"], temperature=-1)


@pytest.mark.parametrize("key, value, message", [
    ("max_steps", True, "max_steps must be an integer >= 1 (or null), got True (bool)"),
    ("learning_rate", "1e-3", "learning_rate must be a finite number > 0, got '1e-3' (str)"),
    ("batch_size", 2.5, "batch_size must be an integer >= 1, got 2.5 (float)"),
    ("schedule", "cosin", "schedule must be one of ['cosine', 'linear', 'constant'], got 'cosin' (str)"),
    ("device", "gpu", "device must be auto, cpu, mps, cuda or cuda:N, got 'gpu' (str)"),
])
def test_defect_11_config_file_values_are_typed(tmp_path, key, value, message, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({key: value}))
    assert run(["pretrain", "--config", str(cfg), "--output-dir", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"pyllm pretrain: error: --config {cfg}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_defect_11_same_checks_for_every_command_and_keyword_arguments(tmp_path):
    from pyllm.train import config as C

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"folder": str(tmp_path), "batch_size": "8"}))
    for cls in (C.EvaluateConfig, C.PredictConfig):
        with pytest.raises(ConfigError, match=rf"{cls.command}: --config .*c.json: batch_size must be an integer "
                                              rf">= 1, got '8' \(str\)"):
            C.from_sources(cls, str(cfg))
    cfg.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"must hold a JSON object, got a list"):
        C.from_sources(C.GenerateConfig, cfg)
    with pytest.raises(ConfigError, match=r"pretrain: max_steps must be an integer >= 1 \(or null\), got True"):
        PretrainConfig(max_steps=True)
    with pytest.raises(ConfigError, match=r"pretrain: unknown option 'max_stepz'"):
        pretrain(max_stepz=3)


def cli_args(*argv):
    import argparse

    p = argparse.ArgumentParser(prog="pyllm")
    cli.add_parsers(p.add_subparsers(dest="command"))
    return p.parse_args(list(argv))


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli_args("pretrain", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("(default:") == out.count("(default: ") and "(default: None)" not in out
    assert "run folder (default: runs/<command>-<timestamp>)" in out
    assert "optimizer steps to run (default: 250)" in out  # PretrainConfig.max_steps
    assert f"stops after {PretrainConfig.time_cap:.0f} s of training" in out


def test_default_run_is_capped_in_one_place():
    """A run given no length option gets its command's time cap, through the CLI and the API alike."""
    from pyllm.train import config as C

    assert C.build(PretrainConfig, ("", {})).max_time == PretrainConfig.time_cap
    assert C.build(PretrainConfig, ("", {"max_steps": 5})).max_time is None
    assert PretrainConfig().max_steps == 250 and PretrainConfig.time_cap == 150.0  # what README and docs state


def test_resume_from_a_broken_run_record_is_a_clear_error(tmp_path):
    (tmp_path / "pyllm_run.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"cannot resume: .*pyllm_run.json is not a pyllm run record"):
        pretrain(output_dir=str(tmp_path), resume=True)
