"""zskt_jax: Zero-shot Knowledge Transfer via Adversarial Belief Matching, in JAX/Flax."""
