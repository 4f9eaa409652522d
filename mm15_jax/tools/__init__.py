"""Command-line tools over the library, one module each (`python -m mm15_jax.tools.NAME`, or
the `mm15-NAME` console script):

  recipe    a staged experiment's stages in order, each from the one before
  generate  answer a prompt about images with a trained model
  video     answer about a video, its frames sampled as images
  sweep     an experiment's sweep, one run per point
  summary   parameter counts and memory of an experiment's model

Training, evaluation, conversion and planning are packages of their own with a `__main__`
(`python -m mm15_jax.train`, `.evaluation`, `.convert`, `.plan`).
"""
