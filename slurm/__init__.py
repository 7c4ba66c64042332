"""kiln.slurm"""
