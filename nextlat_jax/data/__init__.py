"""Data: packing (the batch contract), task generators and the Grain pipeline."""
