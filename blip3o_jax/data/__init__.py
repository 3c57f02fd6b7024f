"""Input data: WebDataset tar shards and JSON/JSONL -> deterministic, resumable, per-host Grain batches.

  tar_index   index tar shards once (member name/offset/size, grouped by key), cached, positioned reads
  sources     TarShardSource, JsonSource: random access to raw samples; BadSampleError, NoValidSampleError
  prompts     the one prompt format for training and inference (t2i_prompt_ids), chat conversations, mrope
  transforms  decode + per-task preprocessing, collation into static-shape batches
  pipeline    DataPipeline (batch = pure function of seed and step), DataIterator (Orbax-checkpointable),
              make_global_batch; the batch schema is documented there
  tokenizer   load_tokenizer(local_dir), build_tiny_tokenizer(out_dir), FastTokenizer
  synthetic   procedurally generated shapes scenes (tools/make_synthetic_shards.py)
"""
