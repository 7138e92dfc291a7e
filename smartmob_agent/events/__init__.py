"""Events: the in-process bus of state changes and the webhooks that carry them out."""
