"""Convert BLIP-2 checkpoints between Hugging Face, LAVIS and qformer_lightning formats.

Examples::

    # Hugging Face retrieval model (directory or hub id) -> our file, run at 364 px
    python tools/convert_checkpoint.py --src Salesforce/blip2-itm-vit-g --dst itm_vitg.pt --image-size 364
    # LAVIS stage-1 checkpoint -> a directory Blip2ForImageTextRetrieval.from_pretrained loads
    python tools/convert_checkpoint.py --src blip2_pretrained.pth --dst hf_dir --to hf
    # our file -> LAVIS .pth ({"model": state_dict})
    python tools/convert_checkpoint.py --src itm_vitg.pt --dst lavis.pth --to lavis

The source format is detected (see ``qformer_lightning.convert.load_pretrained``); ``--to``
picks the output: ``ours`` (default), ``hf`` or ``lavis``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import qformer_lightning  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qformer_lightning.convert import ConversionReport, VisionQFormer, load_pretrained
from qformer_lightning.convert.hf import export_hf_retrieval
from qformer_lightning.convert.lavis import save_lavis_checkpoint
from qformer_lightning.convert.native import save_native
from qformer_lightning.models.blip2 import Blip2QFormerModel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="HF directory or hub id, LAVIS .pth, or our .pt file")
    parser.add_argument("--dst", required=True, help="output file (ours, lavis) or directory (hf)")
    parser.add_argument("--to", choices=("ours", "hf", "lavis"), default="ours", help="output format")
    parser.add_argument("--image-size", type=int, default=None, help="resolution to convert to (resamples position embeddings)")
    parser.add_argument("--no-strict", action="store_true", help="report missing/unexpected keys instead of failing")
    parser.add_argument("--vision-heads", type=int, default=None, help="ViT heads of a LAVIS checkpoint (default 16 at width 1408)")
    parser.add_argument("--qformer-heads", type=int, default=None, help="Q-Former heads of a LAVIS checkpoint (default width/64)")
    parser.add_argument("--no-vision", action="store_true", help="LAVIS output without visual_encoder.* (as LAVIS saves a frozen ViT)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow non-tensor pickled objects in torch files you trust")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> ConversionReport:
    """Load ``args.src`` and write ``args.dst``; returns the import report (export notes appended)."""
    extra = {}
    if args.vision_heads is not None:
        extra["vision_num_heads"] = args.vision_heads
    if args.qformer_heads is not None:
        extra["qformer_num_heads"] = args.qformer_heads
    if args.trust_pickle:
        extra["trust_pickle"] = True
    model, report = load_pretrained(args.src, image_size=args.image_size, strict=not args.no_strict, **extra)
    if not isinstance(model, (Blip2QFormerModel, VisionQFormer)):
        raise SystemExit(f"{args.src} is a bare Q-Former ({type(model).__name__}); nothing to write in a full-model format")
    if args.to == "ours":
        save_native(model, args.dst)
    elif args.to == "lavis":
        save_lavis_checkpoint(model, args.dst, include_vision=not args.no_vision)
    else:
        if not isinstance(model, Blip2QFormerModel):
            raise SystemExit(
                "--to hf writes Blip2ForImageTextRetrieval and needs a stage-1 model (Q-Former text parts and ITC/ITM "
                f"heads); {args.src} holds vision + Q-Former only"
            )
        export = export_hf_retrieval(model, args.dst)
        report.notes.extend(export.notes)
    report.notes.append(f"wrote {args.to} to {args.dst}")
    return report


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(convert(parse_args(argv)).summary())


if __name__ == "__main__":
    main()
