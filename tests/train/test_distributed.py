"""Data parallelism on CPU: 2 gloo processes under torchrun == 1 process with the same global batch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pyllm.train import pretrain
from pyllm.train.report import read_metrics

from .conftest import QUIET, TINY_MODEL

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from pyllm.train import pretrain
    kwargs = json.loads(sys.argv[1])
    pretrain(**kwargs)
""")


def _kwargs(corpus_file, tokenizer_dir, out, mode):
    return dict(train_file=str(corpus_file), tokenizer=str(tokenizer_dir), output_dir=str(out), max_steps=4,
                batch_size=8, log_every=1, learning_rate=3e-3, dropout=0.0, eval_every=2,
                **{**QUIET, "distributed": mode}, **TINY_MODEL)


def _torchrun(tmp_path, kwargs, nproc=2):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, corpus_file):
    tmp = tmp_path_factory.mktemp("ddp")
    # One tokenizer for both runs (and the reference), written by a first tiny run.
    first = pretrain(**{**_kwargs(corpus_file, None, tmp / "one", "none"), "tokenizer": None})
    return first.output_dir, read_metrics(first.output_dir / "metrics.jsonl")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, corpus_file, single_run, mode):
    one_dir, one = single_run
    _torchrun(tmp_path, _kwargs(corpus_file, one_dir, tmp_path / "two", mode))
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    loss1 = [r["loss"] for r in one if "loss" in r]
    loss2 = [r["loss"] for r in two if "loss" in r]
    assert len(loss1) == len(loss2) == 4
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    ev1 = [r["eval_loss"] for r in one if "eval_loss" in r]
    ev2 = [r["eval_loss"] for r in two if "eval_loss" in r]
    assert ev2 == pytest.approx(ev1, rel=1e-4)
    # The tokens count covers both processes' halves of every batch.
    assert two[-1]["tokens"] == one[-1]["tokens"]
    assert (tmp_path / "two" / "model.safetensors").is_file() and (tmp_path / "two" / "checkpoint.safetensors").is_file()


def test_two_processes_stop_and_resume(tmp_path, corpus_file, single_run):
    """DDP run stopped by its time limit after one step, then resumed: the same 4 losses."""
    one_dir, one = single_run
    kwargs = _kwargs(corpus_file, one_dir, tmp_path / "two", "ddp")
    _torchrun(tmp_path, {**kwargs, "max_time": 1e-6})
    assert len([r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in r]) == 1
    _torchrun(tmp_path, {"output_dir": kwargs["output_dir"], "resume": True, "max_time": None})
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["loss"] for r in two if "loss" in r] == pytest.approx([r["loss"] for r in one if "loss" in r],
                                                                    rel=1e-4)
