"""Tests of the copy-and-adapt examples in examples/."""
