"""neuroinit.dynamics"""
