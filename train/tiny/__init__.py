"""Tiny random-weight pipelines for tests and the quickstart, built fully offline.

Generic builders only: offline tokenizers (:mod:`train.tiny.t5_tokenizer`, and the Llama / CLIP ones in
:mod:`train.tiny.text_encoders`), tiny text encoders (:mod:`train.tiny.text_encoders`) and writing a pipeline
folder atomically under a fixed seed (:mod:`train.tiny.pipeline`). The sizes of each family's tiny transformer
and VAE belong to its adapter (``ModelAdapter.tiny_pipeline`` in ``train/models/``); this package imports no
adapter.
"""
