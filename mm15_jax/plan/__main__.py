from mm15_jax.plan.main import run

run()
