"""Population training: many small models as one batched computation (see trainer.population)."""
