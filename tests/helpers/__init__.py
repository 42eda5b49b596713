"""What the tests share: servers and clients, corpora, training runs, W&B files, a proxy."""
