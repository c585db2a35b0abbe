"""Dataset layouts, the pre-training check, paired augmentation and torch datasets."""
