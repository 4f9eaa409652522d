from mm15_jax.evaluation.main import run

run()
