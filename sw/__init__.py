"""bitdet application: data, models, training, evaluation, the host driver and its links, CLI."""
