"""The networks and what a model bundle carries: weights, card, pre- and postprocessing."""
