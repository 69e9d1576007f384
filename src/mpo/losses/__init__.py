"""mpo.losses"""
