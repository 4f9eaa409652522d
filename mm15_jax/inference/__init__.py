"""Inference: KV-cache generation, grounded answers, rendering (see model.py)."""

from mm15_jax.inference.model import Answer, Model, load_model
from mm15_jax.inference.render import render
