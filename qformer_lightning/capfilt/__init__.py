"""CapFilt: bootstrap synthetic captions of a pretraining corpus (BLIP / BLIP-2).

For each web image a captioner samples N captions; these and the web caption are ranked by CLIP
image-text similarity, and the top two become the sample's training captions. Entry point:
``tools/capfilt.py``; docs: ``docs/capfilt.md``.

- :mod:`.ranking`: rank candidates by score, keep the top k (pure functions)
- :mod:`.captioner`: nucleus-sampled captions from a transformers image-to-text model
- :mod:`.scorer`: CLIP cosine similarity of an image with its candidates
- :mod:`.batches`: input shards -> batches of decoded, preprocessed images (loader workers)
- :mod:`.shardio`: output shard names, the done test, the all-or-nothing writer
- :mod:`.pipeline`: the restartable run over a rank's share of the shards
"""

from qformer_lightning.capfilt.batches import ImagePreprocessor, ShardBatches, ShardJob
from qformer_lightning.capfilt.captioner import DEFAULT_CAPTIONER, Captioner, SamplingConfig, batch_seed
from qformer_lightning.capfilt.pipeline import CapFilt, CapfiltSummary, assign_shards
from qformer_lightning.capfilt.ranking import ScoredCaption, rank_captions, top_captions
from qformer_lightning.capfilt.scorer import DEFAULT_CLIP, ClipScorer
from qformer_lightning.capfilt.shardio import ShardWriter, is_done, output_name

__all__ = [
    "DEFAULT_CAPTIONER", "DEFAULT_CLIP", "CapFilt", "CapfiltSummary", "Captioner", "ClipScorer",
    "ImagePreprocessor", "SamplingConfig", "ScoredCaption", "ShardBatches", "ShardJob", "ShardWriter",
    "assign_shards", "batch_seed", "is_done", "output_name", "rank_captions", "top_captions",
]
