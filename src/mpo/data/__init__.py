"""mpo.data"""
