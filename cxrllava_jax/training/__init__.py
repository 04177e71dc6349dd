"""Training for every stage: `cxrllava_jax.training.loop.train_and_evaluate(config, workdir)`."""
