"""The method in plain torch: squeeze, recover, augmentations, views, KD loss, models. No storage, no Ray."""
