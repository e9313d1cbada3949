"""
Builders of tiny OmniFusion models and inputs for tests, demos and benchmarks (not remote code; not shipped in saved
model folders).

- `modeling_omnifusion.testing.tiny`: tokenizers, processors, configs, models, images and chats.
- `modeling_omnifusion.testing.released`: checkpoints in the layouts of AIRI's released OmniFusion files.
"""
