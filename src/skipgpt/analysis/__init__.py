"""Routing analysis: figures and the CSV behind them (see figures.write_analysis)."""
