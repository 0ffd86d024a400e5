"""SAM heads: prompt encoder, two-way transformer and mask decoder."""
