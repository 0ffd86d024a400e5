"""SAM2.1 image-path modules: Hiera backbone, prompt encoder, mask decoder, SAM2Base."""
