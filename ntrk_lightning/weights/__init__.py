"""Shipped weights (package data): the digits16 diffusion model and the 16x16 digit classifiers.
See MODEL_CARD.md in this folder."""
