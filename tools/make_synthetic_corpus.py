"""Generate the synthetic captioned-image corpus (shards, Karpathy JSON, VQAv2 files).

    python tools/make_synthetic_corpus.py --out data/synthetic [--num-train 2000 --image-size 64]

See qformer_lightning/data/synthetic.py for the layout.
"""

from __future__ import annotations

import argparse
import time

from qformer_lightning.data.synthetic import make_synthetic_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="corpus directory (created; reused if identical)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=250)
    args = parser.parse_args()
    start = time.perf_counter()
    corpus = make_synthetic_corpus(
        args.out, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
        image_size=args.image_size, seed=args.seed, shard_size=args.shard_size,
    )
    print(f"synthetic corpus at {corpus.root} ({time.perf_counter() - start:.1f} s)")
    print(f"  shards:   {corpus.shards('train')}  {corpus.shards('val')}")
    print(f"  karpathy: {corpus.karpathy_json}")
    print(f"  vqa:      {corpus.vqa_questions('train')}  {corpus.vqa_annotations('train')}")
    print(f"  images:   {corpus.image_root}")


if __name__ == "__main__":
    main()
