"""mpo.generate"""
