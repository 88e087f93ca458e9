"""Data: formats -> templates and masking -> encoding -> batching and packing -> resumable batch streams
-> DataModules (plain and KD)."""
