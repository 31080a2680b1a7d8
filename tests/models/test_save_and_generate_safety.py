"""Issue 11, model side: a save never leaves an older checkpoint in charge (defect 3), and
generate() checks its token ids and batch before decoding (defect 12)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyllm.models import BertModel, GPTForCausalLM

from .helpers import tiny_config


def _shard(folder):
    """Turn a save into a sharded one (index + 2 shards), as a big transformers save looks."""
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").unlink()


def test_defect3_save_over_a_sharded_checkpoint_loads_the_new_weights(tmp_path):
    torch.manual_seed(0)
    old = BertModel(tiny_config())
    old.save_pretrained(tmp_path / "m")
    _shard(tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("the user's notes")
    assert torch.equal(BertModel.from_pretrained(tmp_path / "m").embeddings.word.weight, old.embeddings.word.weight)
    torch.manual_seed(1)
    new = BertModel(tiny_config())
    new.save_pretrained(tmp_path / "m", overwrite=True)
    back = BertModel.from_pretrained(tmp_path / "m")
    assert torch.equal(back.embeddings.word.weight, new.embeddings.word.weight)
    left = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert left == ["README.md", "config.json", "model.safetensors"]  # stale index and shards gone, notes kept


def test_defect3_save_leaves_no_partial_file_when_writing_fails(tmp_path, monkeypatch):
    torch.manual_seed(0)
    old = BertModel(tiny_config())
    old.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="No space left"):
        BertModel(tiny_config()).save_pretrained(tmp_path / "m", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


def test_defect12_generate_checks_pad_and_eos_ids_up_front():
    model = GPTForCausalLM(tiny_config(eos_token_id=5)).eval()
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"generate: pad_token_id must be a token id in \[0, 97\), got 999"):
        model.generate(prompt, max_new_tokens=3, pad_token_id=999)
    with pytest.raises(ValueError, match=r"generate: eos_token_id must be a token id in \[0, 97\), got -2"):
        model.generate(prompt, max_new_tokens=3, eos_token_id=-2)


def test_defect12_generate_with_an_empty_batch_is_a_clear_error():
    model = GPTForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"generate: input_ids has batch size 0 \(shape \(0, 3\)\); expected at least one prompt"):
        model.generate(torch.zeros(0, 3, dtype=torch.long), max_new_tokens=2)
