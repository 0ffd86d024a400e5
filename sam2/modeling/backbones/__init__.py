"""Image backbones: the Hiera trunk and the FPN neck."""
