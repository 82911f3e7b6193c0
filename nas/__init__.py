"""Search strategies over a supernet's space under a latency target (slimming, Optuna)."""
