"""The ahead-of-time pod planner: does a config fit a TPU topology (or N GPUs), and how fast could it go?

chips: the chips planned for (TPU generations, topologies, simulated GPUs); estimate: the train
step compiled for them and what it needs (memory, FLOPs, step time); report: those as text;
main: the command line (`python -m mm15_jax.plan`, `mm15-plan`) and its sweep.
"""
