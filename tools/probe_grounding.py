"""Probe whether a stage-2, captioning or VQA checkpoint describes the image it is shown.

    python tools/probe_grounding.py runs/demo/caption/checkpoints/last.ckpt [--corpus data/synthetic]
        [--num-beams N] [--limit N] [--batch-size 16] [--pretrained A.ckpt B.ckpt] [--json out.json]

On the synthetic corpus' held-out test images it prints the colour, shape and count accuracy of the
captions (greedy and with the checkpoint's beam settings), distinct captions / distinct scenes,
VQA accuracy per question type (VQA checkpoints) and the grounding gap. Run it from the directory
the training ran in (the checkpoint's config names its weight sources relative to it). How to read
the figures: docs/grounding.md; the logic: qformer_lightning/probe.py.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

from qformer_lightning.probe import probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a one-file .ckpt of `python -m qformer_lightning fit` (stage 2, caption or VQA)")
    parser.add_argument("--corpus", default="data/synthetic", help="the synthetic corpus (with scenes/test.json)")
    parser.add_argument("--num-beams", type=int, default=None, help="beams of the beam figures (default: the checkpoint's)")
    parser.add_argument("--limit", type=int, default=None, help="probe only the first N test images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrained", nargs="*", default=None,
                        help="replace the checkpoint config's pretrained sources (none given: no source)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        report = probe(args.checkpoint, args.corpus, num_beams=args.num_beams, limit=args.limit,
                       batch_size=args.batch_size, pretrained=args.pretrained, device=args.device)
    except (FileNotFoundError, ValueError) as error:  # a missing file or source, a checkpoint of another task
        parser.exit(2, f"probe_grounding: error: {error}\n")
    print(report.table())
    print(report.summary())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(asdict(report), handle, indent=2)


if __name__ == "__main__":
    main()
