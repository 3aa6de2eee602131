"""neuroinit.learning"""
