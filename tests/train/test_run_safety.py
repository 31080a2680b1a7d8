"""Issue 11, training side: runs are transactions, checkpoints load without pickle, data that cannot
be trained on is refused in words, and the commands end in a message, never a traceback.

Each test is named after the defect of issue 11 it covers."""

import hashlib
import json
import os
import random
import shutil
import signal

import pytest
import torch

from pyllm.train import finetune, pretrain
from pyllm.train.report import read_metrics

from .conftest import QUIET, TINY_MODEL
from .test_cli import run

RUN = dict(max_steps=2, batch_size=4, sample_prompt=None, **QUIET, **TINY_MODEL)


def snapshot(folder):
    """{relative path: sha256} of every file under folder (None when it does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def old_run(tmp_path, corpus_file):
    out = tmp_path / "A"
    pretrain(train_file=str(corpus_file), output_dir=str(out), **RUN)
    return out


def _loads_and_resumes(folder):
    from pyllm.models import GPTForCausalLM

    GPTForCausalLM.from_pretrained(folder)
    r = pretrain(output_dir=str(folder), resume=True, progress=False, plot=False)
    assert r.metrics["steps"] == json.loads((folder / "pyllm_run.json").read_text())["config"]["max_steps"]


# -- defect 1: --overwrite never deletes before the new run has something to keep --------------------------


@pytest.mark.parametrize("bad", ["malformed", "empty", "no_model", "own_input", "lr_inf"])
def test_defect1_failing_overwrite_keeps_the_old_run(tmp_path, old_run, tiny_bert, cls_files, bad):
    before = snapshot(old_run)
    kw = dict(output_dir=str(old_run), overwrite=True, max_steps=1, batch_size=4, **QUIET)
    data = tmp_path / "train.jsonl"
    data.write_text({"malformed": '{"text": "a", "label": "x"}\n{not json\n', "empty": ""}.get(bad, ""))
    if bad in ("malformed", "empty"):
        with pytest.raises(ValueError, match=str(data)):
            finetune(model=str(tiny_bert), train_file=str(data), **kw)
    elif bad == "lr_inf":  # refused by the config check, or stopped by the NaN guards: either way before publishing
        for steps in (1, 3):  # one step: finite loss, then inf weights; three: a NaN loss at step 2
            with pytest.raises((ValueError, RuntimeError), match="learning_rate|loss is nan|weights are not finite"):
                finetune(model=str(tiny_bert), train_file=str(cls_files[0]), learning_rate=float("inf"),
                         **{**kw, "max_steps": steps})
    elif bad == "no_model":
        with pytest.raises(FileNotFoundError, match="/nope"):
            finetune(model="/nope", **kw)
    else:  # the run reads its model from the folder it would replace
        with pytest.raises(ValueError, match="--model .* is the output folder"):
            finetune(model=str(old_run), **kw)
    assert snapshot(old_run) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_defect1_overwrite_writes_nothing_until_the_run_has_something_to_keep(tmp_path, old_run, corpus_file,
                                                                               monkeypatch):
    """A run that dies in training before its first checkpoint leaves the old run as it was."""
    from pyllm.train import trainer

    before = snapshot(old_run)

    def boom(*a, **k):
        raise RuntimeError("the machine fell over")

    monkeypatch.setattr(trainer.Trainer, "_step", boom)
    with pytest.raises(RuntimeError, match="fell over"):
        pretrain(train_file=str(corpus_file), output_dir=str(old_run), overwrite=True, **RUN)
    assert snapshot(old_run) == before


def test_non_finite_weights_after_the_last_step_are_never_saved(old_run, corpus_file, monkeypatch):
    """An update can break the weights while the loss it was computed from was finite (the typed config
    now refuses --learning-rate inf, which did this): the run stops before saving, the old run stays."""
    from pyllm.train import NonFiniteLossError, trainer

    before = snapshot(old_run)
    real_step = trainer.Trainer._step

    def breaks_the_weights(self, idx):
        out = real_step(self, idx)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(trainer.Trainer, "_step", breaks_the_weights)
    with pytest.raises(NonFiniteLossError, match=r"weights are not finite after the last update \(.*weight"):
        pretrain(train_file=str(corpus_file), output_dir=str(old_run), overwrite=True, **{**RUN, "max_steps": 1})
    assert snapshot(old_run) == before


def test_output_dir_holding_the_current_folder_is_refused(old_run, corpus_file, monkeypatch):
    """Publishing exchanges the folder as a whole: the shell inside it would be left in a deleted folder."""
    before = snapshot(old_run)
    monkeypatch.chdir(old_run)
    with pytest.raises(ValueError, match="holds the current folder"):
        pretrain(train_file=str(corpus_file), output_dir=".", overwrite=True, **RUN)
    assert snapshot(old_run) == before


# -- defect 2: --overwrite keeps what pyllm did not write --------------------------------------------------


def test_defect2_overwrite_keeps_user_files(old_run, corpus_file):
    (old_run / "NOTES.md").write_text("my notes")
    (old_run / "data").mkdir()
    (old_run / "data" / "extra.jsonl").write_text(corpus_file.read_text())
    old_model = (old_run / "model.safetensors").read_bytes()
    r = pretrain(train_file=str(corpus_file), output_dir=str(old_run), overwrite=True, seed=7, **RUN)
    assert r.output_dir == old_run
    assert (old_run / "NOTES.md").read_text() == "my notes"
    assert (old_run / "data" / "extra.jsonl").read_text() == corpus_file.read_text()
    assert (old_run / "model.safetensors").read_bytes() != old_model
    manifest = json.loads((old_run / "pyllm_run.json").read_text())["files"]
    assert "NOTES.md" not in manifest and "data" not in manifest and "model.safetensors" in manifest
    assert len(read_metrics(old_run / "metrics.jsonl")) == len(r.history)  # the old log did not survive
    # A user file the new run reads is kept; a pyllm file it reads is refused before anything happens.
    pretrain(train_file=str(old_run / "data" / "extra.jsonl"), output_dir=str(old_run), overwrite=True, **RUN)
    assert (old_run / "data" / "extra.jsonl").is_file() and (old_run / "NOTES.md").is_file()
    before = snapshot(old_run)
    with pytest.raises(ValueError, match="--tokenizer .* is the output folder, which --overwrite would replace"):
        pretrain(train_file=str(corpus_file), tokenizer=str(old_run), output_dir=str(old_run), overwrite=True, **RUN)
    assert snapshot(old_run) == before


# -- defect 5: data with one class, or labels that collide ---------------------------------------------


def test_defect5_single_class_or_colliding_labels_are_refused(tmp_path, tiny_bert):
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"the file {i}", "label": "pos"}) + "\n" for i in range(20)))
    with pytest.raises(ValueError, match=r"only one class \('pos'\).*at least two"):
        finetune(model=str(tiny_bert), train_file=str(one), output_dir=str(tmp_path / "o1"), max_steps=1, **QUIET)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"text": f"the file {i}", "label": [1, "1", 0][i % 3]}) + "\n"
                             for i in range(21)))
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: label '1' .* and label 1 .*line 1"):
        finetune(model=str(tiny_bert), train_file=str(mixed), output_dir=str(tmp_path / "o2"), max_steps=1, **QUIET)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# -- defect 6: resume state without pickle -------------------------------------------------------------


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.safetensors"])
def test_defect6_crafted_pickle_in_run_folder_is_refused_and_never_runs(tmp_path, old_run, name, capsys):
    marker = tmp_path / "MARKER"
    for f in old_run.glob("checkpoint*"):
        f.unlink()
    torch.save({"state": Payload(marker)}, old_run / name)  # what torch.load(weights_only=False) would run
    # through the API and through the command line
    with pytest.raises(ValueError, match=rf"{name}.*(not a pyllm checkpoint|pickle)"):
        pretrain(output_dir=str(old_run), resume=True)
    assert run(["pretrain", "--output-dir", str(old_run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err
    assert not marker.exists()


def test_defect6_checkpoint_is_safetensors_and_json(old_run):
    from safetensors import safe_open

    from pyllm.train.checkpoint import load_checkpoint

    assert not (old_run / "checkpoint.pt").exists()
    with safe_open(old_run / "checkpoint.safetensors", framework="pt") as f:
        meta = f.metadata()
    json.loads(meta["pyllm_state"])  # plain data
    ck = load_checkpoint(old_run)
    assert ck["state"]["step"] == 2 and isinstance(ck["rng"][0]["python"], tuple)
    assert isinstance(ck["optimizer"]["param_groups"][0]["betas"], tuple)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_defect10_empty_or_garbage_checkpoint_names_the_file(old_run, content, capsys):
    (old_run / "checkpoint.safetensors").write_bytes(content)
    assert run(["pretrain", "--output-dir", str(old_run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.safetensors" in err and "Traceback" not in err and "not a pyllm checkpoint" in err


# -- defect 7: examples longer than max_length ---------------------------------------------------------


def test_defect7_long_questions_and_tiny_max_length_are_handled(tmp_path, tiny_bert, squad_file, cls_files):
    doc = json.loads(squad_file.read_text())
    q = doc["data"][0]["paragraphs"][0]["qas"][0]
    q["question"] = "What color is the file " + "that is opened first and closed later " * 8 + "?"
    long_q = tmp_path / "long.json"
    long_q.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=r"1 of \d+ questions .* truncated"):
        r = finetune(task="question-answering", model=str(tiny_bert), train_file=str(long_q),
                     output_dir=str(tmp_path / "qa"), max_steps=1, batch_size=4, max_length=32, **QUIET)
    assert r.metrics["steps"] == 1
    with pytest.warns(UserWarning, match="truncated"):
        r = finetune(task="question-answering", model=str(tiny_bert), train_file=str(squad_file),
                     output_dir=str(tmp_path / "qa8"), max_steps=1, batch_size=4, max_length=8, **QUIET)
    assert r.metrics["steps"] == 1
    r = finetune(model=str(tiny_bert), train_file=str(cls_files[0]), output_dir=str(tmp_path / "cls8"), max_steps=1,
                 batch_size=4, max_length=8, **QUIET)
    assert r.metrics["steps"] == 1


# -- defect 10: input and commands that used to end in a traceback ------------------------------------


def test_defect10_non_utf8_input_names_the_file_and_bom_is_accepted(tmp_path):
    from pyllm import data as D

    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(b'{"text": "caf\xe9", "label": "a"}\n\x00\xff\xfe')
    for read in (D.read_texts, D.read_labelled, D.read_conll, D.read_squad):
        with pytest.raises(D.DataError, match=rf"{binary}.*not UTF-8 text"):
            read(binary)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a file", "label": "x"}\n{"text": "b file", "label": "y"}\n')
    assert [r["label"] for r in D.read_labelled(bom)] == ["x", "y"]
    assert D.read_texts(bom) == ["a file", "b file"]


def test_defect10_read_only_output_folder_is_a_clear_error(tmp_path, corpus_file, capsys, monkeypatch):
    real_mkdir = os.mkdir

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "mkdir", read_only)
    assert run(["pretrain", "--train-file", str(corpus_file), "--output-dir", str(tmp_path / "ro" / "run"),
                "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and str(tmp_path / "ro") in err and "Traceback" not in err


def test_defect10_commands_on_the_wrong_input_say_so(tmp_path, tiny_bert, squad_file, old_run, capsys):
    qa = finetune(task="question-answering", model=str(tiny_bert), train_file=str(squad_file),
                  output_dir=str(tmp_path / "qa"), max_steps=1, batch_size=4, max_length=32, **QUIET).output_dir
    assert run(["predict", str(qa), "just some text", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "question-answering" in err and '{"question": ..., "context": ...}' in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"q": "What?", "ctx": "Nothing."}\n')
    assert run(["predict", str(qa), "--file", str(wrong), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{wrong}:1" in err and "'question'" in err and "Traceback" not in err
    assert run(["generate", str(old_run), "", "--device", "cpu"]) == 2
    assert "empty prompt" in capsys.readouterr().err


def test_defect10_check_on_a_device_this_build_lacks(capsys, monkeypatch):
    from pyllm.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU build, on any machine
    assert main(["check", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "CUDA" in err


# -- the kill test: SIGKILL at random moments ------------------------------------------------------------

# The file-system calls a run makes; the child kills itself with SIGKILL just before the k-th, so
# the folder is seen in every state a crash can leave (a kill inside a write is the same state as
# one just before the rename that would publish it).
_FS_CALLS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "symlink"), (os, "unlink"), (os, "mkdir"),
             (os, "rmdir"), (shutil, "rmtree")]


def _child_run(kw, kill_at: int, report_fd: int):
    """Fork a process that runs pretrain(**kw) and SIGKILLs itself before its kill_at-th file-system
    call (0: never; it then writes how many calls it made to report_fd). Returns the pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never return into pytest
        from pyllm.train import run_folder

        calls = [0]

        def counted(fn):
            def call(*a, **k):
                calls[0] += 1
                if calls[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*a, **k)
            return call

        for mod, name in _FS_CALLS:
            setattr(mod, name, counted(getattr(mod, name)))
        run_folder._exchange = counted(run_folder._exchange)  # renameat2 goes through ctypes
        torch.set_num_threads(1)
        pretrain(**kw)
        os.write(report_fd, str(calls[0]).encode())
        code = 0
    finally:
        os._exit(code)


def _run_child(kw, kill_at):
    r, w = os.pipe()
    pid = _child_run(kw, kill_at, w)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    out = os.read(r, 64)
    os.close(r)
    return status, out


def test_kill_at_random_moments_leaves_old_or_loadable_run(tmp_path, corpus_file):
    """SIGKILL an --overwrite run at random moments (eight seeds, anywhere from its first file-system
    call to its last): the folder holds the old run untouched or a new run that loads and resumes,
    and the user's file is always there."""
    target = tmp_path / "target"
    kw = dict(train_file=str(corpus_file), output_dir=str(target), **{**RUN, "max_steps": 4, "save_every": 2})
    pretrain(**kw)
    (target / "NOTES.md").write_text("keep me")
    status, out = _run_child({**kw, "overwrite": True}, 0)
    assert status == 0, "the uninterrupted run failed"
    n_calls = int(out)
    outcomes = []
    for seed in range(8):
        before = snapshot(target)
        kill_at = random.Random(seed).randint(1, n_calls)
        status, _ = _run_child({**kw, "overwrite": True, "seed": seed + 1}, kill_at)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert (target / "NOTES.md").read_text() == "keep me"
        if snapshot(target) == before:
            outcomes.append(f"{kill_at}/{n_calls}: old")
        else:
            _loads_and_resumes(target)
            outcomes.append(f"{kill_at}/{n_calls}: new")
    print("kill outcomes:", outcomes)
    assert any(o.endswith("old") for o in outcomes) and any(o.endswith("new") for o in outcomes)
    # A later run clears what killed runs left next to the folder.
    pretrain(**{**kw, "overwrite": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_ctrl_c_before_the_first_step_keeps_the_old_run(old_run, corpus_file, monkeypatch):
    from pyllm.train import trainer

    before = snapshot(old_run)

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrain(train_file=str(corpus_file), output_dir=str(old_run), overwrite=True, **RUN)
    assert snapshot(old_run) == before
    assert sorted(p.name for p in old_run.parent.iterdir() if p.name.startswith(".")) == []


def test_interrupted_overwrite_publishes_only_a_resumable_run(tmp_path, old_run, corpus_file):
    """Ctrl-C mid-run: the folder then holds the new run, loadable and resumable, and the user's file."""
    from pyllm.train import trainer

    (old_run / "NOTES.md").write_text("keep me")
    real_step = trainer.Trainer._step
    calls = {"n": 0}

    def interrupt_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    trainer.Trainer._step = interrupt_third
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(train_file=str(corpus_file), output_dir=str(old_run), overwrite=True,
                     **{**RUN, "max_steps": 5})
    finally:
        trainer.Trainer._step = real_step
    assert (old_run / "NOTES.md").read_text() == "keep me"
    assert json.loads((old_run / "pyllm_run.json").read_text())["config"]["max_steps"] == 5
    _loads_and_resumes(old_run)


def test_nan_after_a_checkpoint_keeps_it_published_and_names_the_folder(tmp_path, corpus_file, monkeypatch):
    from pyllm.train import NonFiniteLossError, trainer

    real_step = trainer.Trainer._step

    def nan_from_step_3(self, idx):
        out = real_step(self, idx)
        if self.state.step >= 2:
            self._non_finite(float("nan"))
        return out

    monkeypatch.setattr(trainer.Trainer, "_step", nan_from_step_3)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=rf"kept: {out}/checkpoint.safetensors \(step 2\)"):
        pretrain(train_file=str(corpus_file), output_dir=str(out), save_every=2, **{**RUN, "max_steps": 5})
    monkeypatch.setattr(trainer.Trainer, "_step", real_step)
    _loads_and_resumes(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_defect7_a_long_context_is_read_in_overlapping_windows(tmp_path, tiny_bert, squad_file):
    from pyllm import data as D
    from pyllm.train import predict

    tok = D.load_tokenizer(tiny_bert)
    x = D.read_squad(squad_file)[0]
    # short: one window, the same ids as the tokenizer's own pair encoding
    (f,) = D.qa_features([x], tok, max_length=64)
    e = tok.encode_batch([x["question"]], [x["context"]], max_length=64, truncation="only_second")[0]
    assert f["input_ids"] == e.ids and f["token_type_ids"] == e.type_ids
    # long: the answer sits far past max_length; some window holds it, labelled on the answer
    pad = "The file is opened first. " * 12
    long_x = {**x, "context": pad + x["context"],
              "answers": [{**a, "answer_start": a["answer_start"] + len(pad)} for a in x["answers"]]}
    feats = D.qa_features([long_x], tok, max_length=32, stride=8)
    assert len(feats) > 3 and all(len(g["input_ids"]) <= 32 for g in feats)
    hits = [g for g in feats if g["start_positions"] > 0]
    assert hits
    for g in hits:
        s, t = g["start_positions"], g["end_positions"]
        assert long_x["context"][g["offsets"][s][0]:g["offsets"][t][1]] == x["answers"][0]["text"]
    covered = sorted({o for g in feats for o in g["offsets"] if o})
    assert covered[0][0] == 0 and covered[-1][1] == len(long_x["context"].rstrip())  # nothing skipped
    # a QA run answers each question once, from the best of its windows
    qa = finetune(task="question-answering", model=str(tiny_bert), train_file=str(squad_file),
                  output_dir=str(tmp_path / "qa"), max_steps=1, batch_size=4, max_length=32, **QUIET).output_dir
    out = predict(qa, [{"question": x["question"], "context": long_x["context"]}], device="cpu")
    assert len(out) == 1 and (out[0]["start"] == -1 or
                              long_x["context"][out[0]["start"]:out[0]["end"]] == out[0]["answer"])
