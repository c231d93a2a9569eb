"""One rank of an engine: the worker (its device, model shard, KV pool and KV endpoint), the model runner,
host batching, CUDA graphs and warm-up."""
