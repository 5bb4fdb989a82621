"""Labelled data files, finetuning (train) and scoring (evaluate)."""
