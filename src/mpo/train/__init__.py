"""mpo.train"""
