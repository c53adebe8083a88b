"""Text-to-image diffusion for synthetic MEDIC images: the ``adapt`` and ``generate`` stages.

- :mod:`medicsynth.diffusion.tiny`: a tiny Stable-Diffusion-shaped pipeline built offline.
- :mod:`medicsynth.diffusion.train`: adapt training — the demo model from scratch, LoRA for SD.
- :mod:`medicsynth.diffusion.generate`: loading a pipeline and rendering a caption plan in
  seeded, resumable, shardable batches with GPU speed options.
"""
