"""Metrics (Dice, HD95, ASD, cardiac function) and quick-look overlays."""
