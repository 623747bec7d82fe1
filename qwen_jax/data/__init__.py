"""Data: seqio vocabularies, corpus sources, preprocessors, versioned Tasks and Mixtures, and
the resumable input pipeline.

Public API (import the submodule; `import qwen_jax.data` alone does not load TensorFlow):
    qwen_jax.data.pipeline.get_iterator(name, *, split, sequence_length, batch_size, seed,
                                        shard_index=0, num_shards=1, pack=True,
                                        data_dir=None, vocab=None) -> BatchIterator
    qwen_jax.data.tasks.add_corpus_task(...)       register a corpus of your own
    qwen_jax.data.user_files.dataset_name(spec)    a Task/Mixture name, or .jsonl/.txt files
                                                   registered on the fly (data.mixture)
    qwen_jax.data.demo_corpus.build_demo(out)      the embedded corpus
    qwen_jax.data.dedup.dedup_files(...)           offline MinHash+LSH near-dedup
"""
