"""kiln.parallel"""
