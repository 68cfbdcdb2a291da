"""Datasets, transforms and samplers for training and evaluation."""
