"""Images as the vision tower sees them: image keys, the image-feature cache, the pixel cache."""
