"""Sharding policies for FSDP (FSDPStrategy) and FSDP2 (ModelParallelStrategy + fully_shard)."""
