"""Training: optimizer, loss, the jitted step, metrics and the loop."""
