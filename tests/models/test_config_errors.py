"""Typed model configuration (issue 11, defect 11): a config.json with values of the wrong type, or that is
not a JSON object, and a dtype given by name, give clear errors naming the key -- never a raw TypeError,
AttributeError or a misleading message."""

import json

import pytest
import torch

from pyllm.models import BertModel, TransformerConfig

from .helpers import tiny_config


@pytest.fixture()
def bert_folder(tmp_path):
    torch.manual_seed(0)
    BertModel(tiny_config()).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_defect_11_config_json_value_of_the_wrong_type(bert_folder):
    _edit_config(bert_folder, layer_norm_eps="1e-12")
    with pytest.raises(ValueError, match=r"config.json: layer_norm_eps must be a number, got '1e-12' \(str\)"):
        BertModel.from_pretrained(bert_folder)
    _edit_config(bert_folder, layer_norm_eps=1e-12, num_hidden_layers=2.0)
    with pytest.raises(ValueError, match=r"config.json: num_hidden_layers must be an integer, got 2.0 \(float\)"):
        BertModel.from_pretrained(bert_folder)


def test_defect_11_config_json_that_is_a_list(bert_folder):
    (bert_folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object, got a list"):
        BertModel.from_pretrained(bert_folder)


def test_defect_11_from_pretrained_dtype_by_name(bert_folder):
    model = BertModel.from_pretrained(bert_folder, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype must be a torch floating dtype or its name .*got 'float61'"):
        BertModel.from_pretrained(bert_folder, dtype="float61")


def test_transformer_config_checks_float_fields():
    with pytest.raises(ValueError, match=r"TransformerConfig: norm_eps must be a number > 0, got '1e-12'"):
        TransformerConfig(norm_eps="1e-12")
    with pytest.raises(ValueError, match=r"TransformerConfig: hidden_dropout must be in \[0, 1\), got '0.1'"):
        TransformerConfig(hidden_dropout="0.1")


@pytest.mark.parametrize("index", ['{"metadata": {}}', '{"weight_map": ["model-1.safetensors"]}',
                                   '{"weight_map": {"w": 3}}', "[]", "{not json"])
def test_defect_11_shard_index_without_a_weight_map(bert_folder, index):
    (bert_folder / "model.safetensors").unlink()
    path = bert_folder / "model.safetensors.index.json"
    path.write_text(index)
    with pytest.raises(ValueError, match=rf"from_pretrained: {path}: .*weight_map"):
        BertModel.from_pretrained(bert_folder)
