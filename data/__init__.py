"""kiln.data"""
