"""`python eval.py ckpt_path=<checkpoint or run folder>`: a trained model's loss, perplexity and
bits per byte on the run's held-out split, on text files, or on a whole epoch of a stream.

config.py: the schema of conf/eval.yaml and `validate`; texts.py: the text to evaluate, as the
token windows training validates on; figures.py: the checkpoint, the model rebuilt from it, the
figures; task.py: one evaluation, eval.json and its W&B run.
"""
