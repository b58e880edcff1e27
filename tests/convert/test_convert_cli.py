"""tools/convert_checkpoint.py: HF directory -> ours -> LAVIS -> HF directory keeps the weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from convert_tiny import blip2_config, inputs, perturb_
from transformers import Blip2ForImageTextRetrieval

from qformer_lightning.convert import load_pretrained

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
_spec = importlib.util.spec_from_file_location("convert_checkpoint", _TOOL)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


@torch.no_grad()
def test_cli_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    hf = perturb_(Blip2ForImageTextRetrieval(blip2_config(vision_eps=1e-6))).eval()
    hf.save_pretrained(tmp_path / "hf")
    tool.main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ours.pt")])
    assert "hf:Blip2ForImageTextRetrieval" in capsys.readouterr().out
    tool.main(["--src", str(tmp_path / "ours.pt"), "--dst", str(tmp_path / "lavis.pth"), "--to", "lavis"])
    tool.main(["--src", str(tmp_path / "lavis.pth"), "--dst", str(tmp_path / "hf2"), "--to", "hf",
               "--vision-heads", "2", "--qformer-heads", "4"])
    back = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf2").eval()
    pixels, ids, mask = inputs(28)
    for itm in (True, False):
        want = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        got = back(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        assert (want.logits_per_image - got.logits_per_image).abs().max() <= 1e-5
    ours, _ = load_pretrained(tmp_path / "ours.pt")
    lavis, _ = load_pretrained(tmp_path / "lavis.pth", vision_num_heads=2, qformer_num_heads=4)
    assert torch.equal(ours.temp, lavis.temp) and torch.equal(ours.lm_head.dense.weight, lavis.lm_head.dense.weight)
