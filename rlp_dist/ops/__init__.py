"""Operations: preemption-safe stopping and cluster (SLURM) helpers. Imports nothing heavy."""
