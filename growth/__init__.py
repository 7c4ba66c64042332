"""kiln.growth"""
