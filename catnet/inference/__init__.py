"""A trained (or pretrained) model at work: predict, export, serve."""
