"""One test per user-facing error message (issue 8): a hub id with no network, a missing data path,
a config typo, a checkpoint from another stage, an image size the encoder cannot take, and a
request the model cannot serve. Each asserts what the message says."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "predict"))
from predict_tiny import run_predict, save_tokenizer, stage1_config, stage2_config, write_config, write_images  # noqa: E402

from qformer_lightning.cli import Blip2CLI  # noqa: E402
from qformer_lightning.encoders.vision import TimmVisionEncoder  # noqa: E402
from qformer_lightning.errors import (  # noqa: E402
    HubUnreachableError, check_image_size, task_mismatch_message,
)

TINY_VIT = dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=14)
FRAGMENT = Path(__file__).resolve().parents[1] / "configs" / "predict" / "jsonl.yaml"
LLM_OPTION = "model.init_args.model.init_args.llm.init_args.name_or_path"


# ---------------------------------------------------------------------------- a hub id with no network
def test_llm_hub_id_offline_says_how_to_pass_a_local_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    from qformer_lightning.encoders.llm import LanguageModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as info:
        LanguageModel("facebook/opt-125m").load()
    message = str(info.value)
    assert "could not load the language model 'facebook/opt-125m' from the Hugging Face hub" in message
    assert "HF_HUB_OFFLINE=1 is set and it is not in the local cache" in message
    assert "hf download facebook/opt-125m --local-dir DIR" in message and f"set {LLM_OPTION} to it" in message


def test_timm_weights_offline_say_how_to_pass_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as info:
        TimmVisionEncoder("vit_tiny_patch16_224", image_size=224, pretrained=True)
    message = str(info.value)
    assert "image encoder weights 'vit_tiny_patch16_224'" in message
    assert "set pretrained: false and checkpoint_path to the file" in message
    assert "vision.init_args.checkpoint_path" in message


def test_a_local_path_typo_is_not_reported_as_a_hub_problem(tmp_path) -> None:
    from qformer_lightning.encoders.llm import LanguageModel

    missing = str(tmp_path / "weights" / "opt-125m")
    with pytest.raises(FileNotFoundError, match=r"the language model path '.*weights/opt-125m' does not exist \(set model.init_args"):
        LanguageModel(missing).load()


def test_pretrained_hub_id_offline_names_the_local_directory_route(monkeypatch: pytest.MonkeyPatch) -> None:
    from qformer_lightning.convert.hf import read_hf_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Salesforce/blip2-itm-vit-g.*pass the local directory"):
        read_hf_checkpoint("Salesforce/blip2-itm-vit-g")


def test_tokenizer_hub_id_offline_says_pass_a_local_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    from qformer_lightning.encoders.tokenizer import build_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="(?s)no-such-owner/bert.*pass a local directory"):
        build_tokenizer("no-such-owner/bert")


# ---------------------------------------------------------------------------- a missing data path
def test_missing_annotation_file_is_named(tmp_path) -> None:
    from qformer_lightning.data.caption_datamodule import CaptionDataModule, CaptionSplit

    missing = str(tmp_path / "coco" / "dataset_coco.json")
    data = CaptionDataModule(train=CaptionSplit(annotations=missing, image_root=str(tmp_path)), num_workers=0)
    with pytest.raises(FileNotFoundError, match=f"annotation file '{missing}' does not exist"):
        data.setup("fit")


def test_missing_image_root_is_named(tmp_path) -> None:
    from qformer_lightning.data.datasets import check_image_files

    with pytest.raises(FileNotFoundError, match=f"image root '{tmp_path / 'images'}' does not exist"):
        check_image_files(str(tmp_path / "images"), ["a.jpg"])


def test_shard_glob_matching_nothing_is_named(tmp_path) -> None:
    from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource

    pattern = str(tmp_path / "shards" / "*.tar")
    data = ShardDataModule(sources=[ShardSource(urls=pattern)], num_workers=0)
    with pytest.raises(FileNotFoundError, match="shard"):
        data.setup("fit")
    try:
        data.setup("fit")
    except FileNotFoundError as err:
        assert str(tmp_path / "shards") in str(err)


def test_missing_predict_image_is_named(tmp_path) -> None:
    from qformer_lightning.data.predict import PredictDataModule

    data = PredictDataModule(images=[str(tmp_path / "holiday.jpg")], image_size=28)
    with pytest.raises(FileNotFoundError, match=f"image path '{tmp_path / 'holiday.jpg'}' does not exist"):
        data.setup("predict")


# ---------------------------------------------------------------------------- a config typo
def _parse(args: list[str], run: bool = False) -> None:
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        Blip2CLI(args=args, run=run)


def test_config_file_typo_names_the_key(tmp_path, capsys: pytest.CaptureFixture) -> None:
    config = stage1_config()
    config["model"]["init_args"]["max_txt_length"] = config["model"]["init_args"].pop("max_text_length")
    path = write_config(tmp_path / "typo.yaml", config)
    with pytest.raises(SystemExit):
        _parse(["--config", str(path)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "config error: model.init_args.max_txt_length is not an option (did you mean max_text_length?)"


def test_command_line_typo_names_the_key(tmp_path, capsys: pytest.CaptureFixture) -> None:
    path = write_config(tmp_path / "s1.yaml", stage1_config())
    with pytest.raises(SystemExit):
        _parse(["predict", "--config", str(path), "--trainer.acelerator", "cpu"], run=True)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "config error: trainer.acelerator is not an option (did you mean accelerator?)"


# ---------------------------------------------------------------------------- a checkpoint from another stage
def test_stage1_checkpoint_in_a_stage2_run_says_use_pretrained(tmp_path) -> None:
    photo = write_images(tmp_path / "photos", 1)[0]
    stage1 = run_predict(write_config(tmp_path / "s1.yaml", stage1_config()), "--data.images", str(photo), "--data.texts", '["a"]',
                         "--trainer.callbacks.init_args.output", str(tmp_path / "a.jsonl"))
    stage1.trainer.save_checkpoint(tmp_path / "stage1.ckpt")
    config = write_config(tmp_path / "s2.yaml", stage2_config(save_tokenizer(tmp_path / "tok")))
    args = ["predict", "--config", str(config), "--config", str(FRAGMENT), "--data.images", str(photo),
            "--ckpt_path", str(tmp_path / "stage1.ckpt"), "--trainer.callbacks.init_args.output", str(tmp_path / "b.jsonl"),
            "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(ValueError) as info, mock.patch.object(sys, "argv", sys.argv[:1]):
        Blip2CLI(args=args)
    message = str(info.value)
    assert "checkpoint was written by task qformer_lightning.tasks.stage1.Stage1" in message
    assert "this run's task is qformer_lightning.tasks.stage2.Stage2" in message and "`pretrained` option" in message


def test_task_check_on_load_gives_the_same_message(tmp_path) -> None:
    """Outside the CLI (trainer.predict(ckpt_path=...)) the task's on_load_checkpoint says the same."""
    from qformer_lightning.tasks.stage2 import Stage2

    task = Stage2.__new__(Stage2)  # on_load_checkpoint reads only the class and the checkpoint
    checkpoint = {"qformer_lightning": {"task": "Stage1", "task_class": "qformer_lightning.tasks.stage1.Stage1"}}
    with pytest.raises(ValueError) as info:
        Stage2.on_load_checkpoint(task, checkpoint)
    assert str(info.value) == task_mismatch_message("qformer_lightning.tasks.stage1.Stage1", "qformer_lightning.tasks.stage2.Stage2")


# ---------------------------------------------------------------------------- an image size the encoder cannot take
def test_image_size_not_a_multiple_of_the_patch() -> None:
    with pytest.raises(ValueError, match=r"image_size 30 cannot be taken by eva_giant_patch14_clip_224: .*patch size 14 \(e.g. 28 or 42\); set vision.init_args.image_size"):
        TimmVisionEncoder(image_size=30, model_kwargs=TINY_VIT)
    check_image_size(28, 14, "eva_giant_patch14_clip_224")


def test_images_of_another_size_than_the_encoder_is_built_for() -> None:
    encoder = TimmVisionEncoder(image_size=28, model_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match="images are 42x42, the image encoder is built for 28x28: set data.init_args.image_size to 28"):
        encoder(torch.zeros(1, 3, 42, 42))


def test_predict_image_size_other_than_the_encoders() -> None:
    from qformer_lightning.data.predict import PredictDataModule

    encoder = TimmVisionEncoder(image_size=28, model_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match="image_size=224, but the model's image encoder takes 28x28 images: drop image_size"):
        PredictDataModule(images="x", image_size=224).resolve_image_settings(encoder)


# ---------------------------------------------------------------------------- a request the model cannot serve
def test_caption_request_to_a_stage1_model_says_use_stage2(tmp_path) -> None:
    photo = write_images(tmp_path / "photos", 1)[0]
    with pytest.raises(ValueError, match="a stage-1 model scores image-text pairs .* captions, answers and free prompts need a stage-2 model"):
        run_predict(write_config(tmp_path / "s1.yaml", stage1_config()), "--data.images", str(photo),
                    "--trainer.callbacks.init_args.output", str(tmp_path / "a.jsonl"))
