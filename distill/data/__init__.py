"""Data: formats -> templates and masking -> encoding -> batching and packing -> resumable batch streams
-> DataModules. A leaf: the teachers' targets (``distill.teacher``) and on-policy rounds
(``distill.rollout``) are composed in above it."""
