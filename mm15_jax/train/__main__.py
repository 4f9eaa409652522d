from mm15_jax.train.main import run

run()
