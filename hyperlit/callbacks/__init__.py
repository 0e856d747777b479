"""Lightning callbacks: plots of hyperparameter schedules, Pareto fronts and accuracy matrices (rank 0 only)."""
