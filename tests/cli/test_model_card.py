"""The model card of a JD run names hf_jd, the aggregator and the JD settings, with Hub tags."""

from __future__ import annotations

import transformers.trainer as trainer_module
from _cli_fixtures import tiny_args, tiny_bert, tiny_dataset
from huggingface_hub import ModelCard

from hf_jd import JDTrainer


def _trainer(tmp_path, **overrides) -> JDTrainer:
    args = tiny_args(str(tmp_path / "out"), **overrides)
    return JDTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())


def test_save_model_writes_a_tagged_card_with_the_jd_settings(tmp_path):
    trainer = _trainer(tmp_path, aggregator="mgda", aggregator_kwargs='{"epsilon": 0.01}')
    trainer.train()
    trainer.save_model()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"hf_jd", "jacobian-descent", "mgda", "per_example"} <= set(card.data.tags)
    text = card.text
    assert "## Jacobian descent" in text and "hf_jd" in text
    assert "| `aggregator` | `'mgda'` |" in text
    assert "| `aggregator_kwargs` | `{'epsilon': 0.01}` |" in text
    assert "| `jd_objectives` | `'per_example'` |" in text
    assert "arXiv:2406.16232" in text
    assert "hf_jd" in trainer.model.model_tags  # model.push_to_hub tags its card too


def test_save_model_elsewhere_and_twice_keeps_one_section(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.save_model(str(tmp_path / "elsewhere"))
    trainer.save_model(str(tmp_path / "elsewhere"))
    text = (tmp_path / "elsewhere" / "README.md").read_text()
    assert text.count("## Jacobian descent") == 1
    assert trainer.args.output_dir == str(tmp_path / "out")  # restored
    assert not (tmp_path / "out" / "README.md").exists()


def test_create_model_card_keeps_the_callers_tags(tmp_path):
    trainer = _trainer(tmp_path)
    (tmp_path / "out").mkdir(exist_ok=True)
    trainer.create_model_card(tags=["my-tag"], model_name="tiny")
    tags = ModelCard.load(tmp_path / "out" / "README.md").data.tags
    assert tags[0] == "my-tag" and "hf_jd" in tags and "upgrad" in tags


def test_push_to_hub_uploads_the_jd_card_unchanged(tmp_path, monkeypatch):
    """push_to_hub is the stock method: it saves, writes the card through create_model_card, uploads."""
    uploaded = {}

    class FakeApi:
        def upload_folder(self, folder_path, **kwargs):
            uploaded["card"] = (tmp_path / "out" / "README.md").read_text()
            uploaded["files"] = sorted(p.name for p in (tmp_path / "out").iterdir())
            return "ok"

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    trainer = _trainer(tmp_path)
    trainer.hub_model_id = "someone/tiny-jd"  # skips init_hf_repo (no network)
    assert trainer.push_to_hub() == "ok"
    assert "## Jacobian descent" in uploaded["card"] and "- jacobian-descent" in uploaded["card"]
    assert "model.safetensors" in uploaded["files"]
