"""Conversion of AIRI's released OmniFusion checkpoints to the Hugging Face format."""
