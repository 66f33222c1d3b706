"""Training and evaluation on feature stores and videos: runs, splits, the training loop, metrics."""
