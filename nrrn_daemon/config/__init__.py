"""Strict instrument profiles (pydantic), how they are found and loaded, output naming."""
