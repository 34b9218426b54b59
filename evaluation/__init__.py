"""Evaluation: FID, sFID, Inception Score, precision/recall as the ADM evaluator computes them."""
