"""kiln.trainer"""
