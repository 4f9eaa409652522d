from mm15_jax.convert.main import run

run()
